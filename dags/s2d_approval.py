"""The optional approval step after the promotion gate: Airflow 3's human-in-the-loop branch operator.

With the trigger form's ``approval`` on (or a schedule's ``conf: {approval: true}``), ``promote`` holds a passing
version (``promote.approval``) and the ``approval`` task waits for a person in the Airflow UI (the run's
*Required actions*), showing the gate's comparison: **Approve** runs ``promote_approved`` (``python -m stages
promote --approve``: ``@champion`` moves), **Reject** runs ``promote_rejected`` (``--reject``: the champion
stays; the verdict is tagged on the version either way). No answer within ``approval_timeout_hours``
(setting, default 72) takes the default, Reject. Nothing held (the gate kept the champion, or approval is
off): the task is skipped, and so are both verdict tasks. Setting ``approvers`` (comma-separated Airflow
user ids) restricts who may answer.
"""

from __future__ import annotations

import functools
from datetime import timedelta

import s2d_contract as c
import s2d_settings as s

APPROVE, REJECT = "Approve", "Reject"
BRANCHES = {APPROVE: "promote_approved", REJECT: "promote_rejected"}


def timeout() -> timedelta:
    return timedelta(hours=float(s.setting("approval_timeout_hours", "72")))


@functools.cache
def operator_class() -> type:
    from airflow.providers.standard.operators.hitl import HITLBranchOperator

    class PromotionApproval(HITLBranchOperator):
        """Waits only when ``promote`` held a version; keeps who answered in XCom (key ``response``)."""

        def execute(self, context):
            from airflow.sdk.exceptions import AirflowSkipException

            out = context["ti"].xcom_pull(task_ids="promote")
            out = c.last_json(out) if isinstance(out, str) else (out or {})
            if out.get("status") != "awaiting approval":
                raise AirflowSkipException(f"nothing to approve: the gate's decision is {out.get('status') or 'none'}")
            self.subject = f"Make version {out.get('version')} of the student the champion?"
            hours = timeout().total_seconds() / 3600
            self.body = ("The promotion gate passed; the champion moves only if you approve "
                         f"(no answer in {hours:g} h rejects).\n\n```\n{out.get('comparison', '')}\n```")
            return super().execute(context)

        def execute_complete(self, context, event):
            user = event.get("responded_by_user") or {}
            by = user.get("name") or user.get("id") if isinstance(user, dict) else str(user)
            if event.get("error_type") == "timeout" or not by:
                by = "timeout"
            context["ti"].xcom_push(key="response", value={"by": str(by)[:100], "chosen": event.get("chosen_options")})
            return super().execute_complete(context, event)

    return PromotionApproval


def approval_task():
    approvers = [{"id": u, "name": u} for u in s.listed("approvers", ())]
    return operator_class()(
        task_id="approval",
        subject="Promote the new student?",
        options=[APPROVE, REJECT],
        options_mapping=BRANCHES,
        defaults=[REJECT],
        response_timeout=timeout(),
        assigned_users=approvers or None,
    )
