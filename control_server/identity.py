"""Who is calling: the authenticated actor of the current RPC, shared by auth and service."""

from __future__ import annotations

from contextvars import ContextVar

__all__ = ["ACTOR", "ANONYMOUS", "ROLE", "current_actor", "current_role"]

#: The actor of a server started without an auth file.
ANONYMOUS = "anonymous"

#: The token name of the caller; set by the auth interceptor in the task running the RPC.
ACTOR: ContextVar[str] = ContextVar("actor", default=ANONYMOUS)
#: The role of the caller's token, set beside ACTOR; without auth every caller is admin.
ROLE: ContextVar[str] = ContextVar("role", default="admin")


def current_actor() -> str:
    """The name of the token the current RPC was authenticated with ("anonymous" without auth)."""
    return ACTOR.get()


def current_role() -> str:
    """The role of the token the current RPC was authenticated with ("admin" without auth)."""
    return ROLE.get()
