"""Prefect's own reference for "apply a deployment": RunnerDeployment.apply() in a loop.

Usage: python python_apply.py N WORK_POOL   (PREFECT_API_URL names the server)
Prints one JSON line: {"n": N, "seconds": S}. Each deployment mirrors the benchmark's
PrefectDeployments: one cron schedule, parameters with a schema, tags, and an event
trigger on every fourth.
"""

import json
import sys
import time

from prefect.client.schemas.actions import DeploymentScheduleCreate
from prefect.client.schemas.schedules import CronSchedule
from prefect.deployments.runner import RunnerDeployment
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
from prefect.utilities.callables import ParameterSchema


def main() -> None:
    n, pool = int(sys.argv[1]), sys.argv[2]
    schema = ParameterSchema(
        type="object",
        properties={"index": {"type": "integer"}, "label": {"type": "string"}},
    )
    started = time.perf_counter()
    for i in range(n):
        d = RunnerDeployment(
            name=f"bench-{i}",
            flow_name="bench-flow",
            entrypoint="flows/bench.py:bench_flow",
            work_pool_name=pool,
            tags=["bench", f"group-{i % 10}"],
            parameters={"index": i, "label": "bench"},
            schedules=[
                DeploymentScheduleCreate(
                    schedule=CronSchedule(cron=f"{i % 60} * * * *"), slug="hourly"
                )
            ],
            triggers=[DeploymentEventTrigger(expect={"bench.event"})] if i % 4 == 0 else [],
            enforce_parameter_schema=True,
        )
        d._parameter_openapi_schema = schema
        d.apply()
    print(json.dumps({"n": n, "seconds": time.perf_counter() - started}))


if __name__ == "__main__":
    main()
