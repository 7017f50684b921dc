"""Alerts: what must reach a person, by e-mail (the SMTP provider's hook) and/or a webhook (a JSON POST).

Events (setting ``alert_events``, comma-separated; default all of them):

- ``run_failed``: a DAG run failed (the DAG's failure callback; the failed tasks named);
- ``trigger_refused``: a run failed because the trigger's values were refused (``s2d_policy.refusal``);
- ``gate_failed``: the promotion gate kept the champion (``promote``'s decision ``kept``);
- ``approval_needed``: a promotion waits for a person (the approval task; its link in the message);
- ``missed_slot``: a scheduled run started too late and was skipped (``s2d_schedules.skip_missed_slot``).

Settings (env ``S2D_*`` / Variables ``s2d_*``): ``alert_emails`` (comma-separated addresses; sent through the
Airflow connection ``alert_smtp_conn_id``, default ``smtp_default``, with the SMTP provider), ``alert_webhook``
(a URL: Slack/Teams-style incoming webhooks take the ``text`` field; the URL may hold a token, so it is never
logged), ``alert_timeout_s`` (10). Nothing configured: nothing is sent. A channel that fails is logged and
never fails the task or callback that raised the alert.
"""

from __future__ import annotations

import json
import logging
import urllib.request

import s2d_settings as s

log = logging.getLogger(__name__)
EVENTS = ("run_failed", "trigger_refused", "gate_failed", "approval_needed", "missed_slot")


def wanted(event: str) -> bool:
    return event in s.listed("alert_events", EVENTS)


def notify(event: str, subject: str, text: str, **fields) -> dict[str, str]:
    """Send one alert on every configured channel; returns ``{channel: "sent" | why not}``."""
    if event not in EVENTS:
        raise ValueError(f"unknown alert event {event!r} (one of {', '.join(EVENTS)})")
    if not wanted(event):
        return {}
    subject = f"[s2d] {subject}"
    out = {}
    emails = s.listed("alert_emails", ())
    if emails:
        out["email"] = _email(emails, subject, text)
    url = s.setting("alert_webhook")
    if url:
        out["webhook"] = _webhook(url, {"event": event, "subject": subject, "text": f"{subject}\n{text}", **fields})
    for channel, result in out.items():
        if result != "sent":
            log.warning("alert %s by %s not sent: %s", event, channel, result)
    return out


def _timeout() -> float:
    return float(s.setting("alert_timeout_s", "10"))


def _email(to: tuple[str, ...], subject: str, text: str) -> str:
    import html

    try:
        from airflow.providers.smtp.hooks.smtp import SmtpHook

        with SmtpHook(s.setting("alert_smtp_conn_id", "smtp_default")) as hook:
            hook.send_email_smtp(to=list(to), subject=subject, html_content=f"<pre>{html.escape(text)}</pre>")
        return "sent"
    except Exception as e:  # noqa: BLE001 - an alert channel must never fail the task that raises it
        return f"{type(e).__name__}: {str(e)[:200]}"


def _webhook(url: str, payload: dict) -> str:
    req = urllib.request.Request(url, data=json.dumps(payload, default=str).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=_timeout()) as r:  # noqa: S310 - the deployment's own URL
            return "sent" if 200 <= r.status < 300 else f"HTTP {r.status}"
    except Exception as e:  # noqa: BLE001 - an alert channel must never fail the task that raises it
        return f"{type(e).__name__}: {str(e)[:200]}"  # the URL (a token, maybe) is not in the message


def _where(context) -> dict:
    dag_run = context.get("dag_run")
    return {"dag_id": getattr(dag_run, "dag_id", None), "run_id": getattr(dag_run, "run_id", None)}


def run_failed(context) -> None:
    """The DAG's ``on_failure_callback``: a refused trigger (the trigger's values, checked again here) or a
    failed run (the tasks that failed)."""
    import s2d_policy as policy

    where = _where(context)
    params = dict(context.get("params") or {})
    dag = context.get("dag")
    form = set(getattr(dag, "params", {}) or params)
    problem = policy.refusal(params, form) if params else None
    if problem:
        notify("trigger_refused", f"{where['dag_id']}: trigger refused", f"run {where['run_id']}: error: {problem}", **where)
        return
    # Airflow builds the callback's context from the task instance that failed last
    ti = context.get("ti") or context.get("task_instance")
    last = getattr(ti, "task_id", None)
    reason = context.get("reason") or "a task failed"
    notify("run_failed", f"{where['dag_id']}: run failed", f"run {where['run_id']}: {reason}; the task that failed last: "
           f"{last or '-'} (the run's grid shows every task)", last_failed_task=last, **where)


def gate_outcome(context, result) -> None:
    """``promote``'s post-execute hook: the gate kept the champion (``gate_failed``) or a promotion waits for
    approval (``approval_needed``). ``result``: the stage command's JSON summary (dict, or the container's text)."""
    import s2d_contract as c

    out = c.last_json(result) if isinstance(result, str) else (result or {})
    where = _where(context)
    text = out.get("comparison") or json.dumps(out)
    if out.get("status") == "kept":
        notify("gate_failed", f"{where['dag_id']}: the new student was not promoted (version {out.get('version')})",
               f"run {where['run_id']}\n{text}", version=out.get("version"), champion=out.get("champion"), **where)
    elif out.get("status") == "awaiting approval":
        notify("approval_needed", f"{where['dag_id']}: approve version {out.get('version')} as champion?",
               f"run {where['run_id']}: open the task 'approval' of the run in Airflow (Required actions)\n{text}",
               version=out.get("version"), **where)


def missed_slot(context, why: str) -> None:
    where = _where(context)
    notify("missed_slot", f"{where['dag_id']}: a scheduled run was skipped", f"run {where['run_id']}: {why}", **where)
