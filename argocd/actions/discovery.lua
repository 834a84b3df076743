-- Argo CD resource actions for prefect.io/PrefectDeployment: which are offered.
-- Lua 5.1 dialect (gopher-lua).
local actions = {}
local paused = obj.spec ~= nil and obj.spec.deployment ~= nil and obj.spec.deployment.paused == true
actions["reconcile"] = {}
actions["run-now"] = { ["disabled"] = obj.status == nil or obj.status.deploymentId == nil }
actions["pause"] = { ["disabled"] = paused }
actions["resume"] = { ["disabled"] = not paused }
return actions
