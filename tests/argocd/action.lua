-- Runs an Argo CD resource action (or the discovery script) the way Argo CD does: the
-- object is the global `obj`; an action returns the changed object, printed as YAML;
-- discovery returns the actions, printed as "name enabled|disabled" lines.
-- Usage: lua action.lua script.lua object.yaml
local lyaml = require("lyaml")
local run = dofile((arg[0]:match("(.*/)") or "./") .. "sandbox.lua")
local result = run(arg[1], arg[2])
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
