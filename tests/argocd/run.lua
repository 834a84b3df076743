-- Runs an Argo CD health check; prints its status and message.
-- Usage: lua run.lua health.lua object.yaml
local run = dofile((arg[0]:match("(.*/)") or "./") .. "sandbox.lua")
local hs = run(arg[1], arg[2])
io.write(hs.status, "\n", hs.message or "", "\n")
