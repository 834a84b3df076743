-- Pauses the deployment's schedules in Prefect (spec.deployment.paused: true).
-- In an app with self-heal, Git's value wins again at the next sync: commit the
-- change there to keep it.
obj.spec.deployment.paused = true
return obj
