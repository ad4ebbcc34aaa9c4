// Actions: the message an action left for the next page (a short-lived cookie set
// by the console after the server answered), and the keyboard on a confirmation
// page (the Confirm button has the focus, so Enter confirms; Esc cancels).
"use strict";
(function () {
  const name = "tc_flash=";
  const found = document.cookie.split("; ").find((c) => c.startsWith(name));
  if (found) {
    document.cookie = "tc_flash=; Max-Age=0; path=/; SameSite=Strict";
    try {
      const message = JSON.parse(decodeURIComponent(found.slice(name.length)));
      if (window.TC && message.text) window.TC.flash(message.text, message.kind || "ok");
    } catch (error) {
      // A cookie we cannot read says nothing worth showing.
    }
  }

  const cancel = document.querySelector("[data-confirm-cancel]");
  if (cancel) {
    const yes = document.getElementById("confirm-yes");
    if (yes) yes.focus();
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape") {
        event.preventDefault();
        window.location.assign(cancel.getAttribute("href"));
      }
    });
  }
})();
