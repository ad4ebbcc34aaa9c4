"""`control-server console`: the operators' web console, a client of ControlAdmin.

It holds no store connection and no token of its own: each person signs in with
their own token, every call carries it, so roles, the audit and replicas work as
for `controlctl`. `client` is the gRPC side, `app` sessions, rendering, the live
feed (server-sent events fed by WatchDecisions) and the HTTP server; one module per
page (`fleet`, `run_page`, `policies`, `experiments`, `audit_page`) and one for
the actions that change something (`actions`). Templates (Jinja2, autoescaped)
and every asset (uPlot for the charts, MIT) are served by the console itself: it
works on a cluster without internet.
"""
