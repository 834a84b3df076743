-- Runs an Argo CD resource action (or the discovery script) the way Argo CD does: the
-- object is the global `obj`; an action returns the changed object, printed as YAML;
-- discovery returns the actions, printed as "name enabled|disabled" lines.
-- Usage: lua action.lua script.lua object.yaml
local lyaml = require("lyaml")
local script_path, object_path = arg[1], arg[2]
local f = assert(io.open(object_path))
local obj = lyaml.load(f:read("*a"))
f:close()
local env = setmetatable({ obj = obj }, { __index = _G })
local chunk
if setfenv then
  chunk = assert(loadfile(script_path))
  setfenv(chunk, env)
else
  chunk = assert(loadfile(script_path, "t", env))
end
local result = chunk()
if result.kind ~= nil then
  io.write(lyaml.dump({ result }))
else
  local names = {}
  for name in pairs(result) do
    table.insert(names, name)
  end
  table.sort(names)
  for _, name in ipairs(names) do
    local state = "enabled"
    if result[name].disabled then
      state = "disabled"
    end
    io.write(name, " ", state, "\n")
  end
end
