-- Runs an Argo CD Lua script the way Argo CD does: the object, read from a YAML file,
-- is the global `obj`; returns what the script returns. Works under Lua 5.1 and 5.4.
local lyaml = require("lyaml")
return function(script_path, object_path)
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
  return chunk()
end
