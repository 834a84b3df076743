-- Resumes the deployment's schedules in Prefect (spec.deployment.paused: false).
obj.spec.deployment.paused = false
return obj
