-- Runs an Argo CD health check the way Argo CD does: the object is the global `obj`,
-- the script's return value is the health. Works under Lua 5.1 and 5.4.
-- Usage: lua run.lua health.lua object.yaml
local lyaml = require("lyaml")
local check_path, object_path = arg[1], arg[2]
local f = assert(io.open(object_path))
local obj = lyaml.load(f:read("*a"))
f:close()
local env = setmetatable({ obj = obj }, { __index = _G })
local chunk
if setfenv then
  chunk = assert(loadfile(check_path))
  setfenv(chunk, env)
else
  chunk = assert(loadfile(check_path, "t", env))
end
local hs = chunk()
io.write(hs.status, "\n", hs.message or "", "\n")
