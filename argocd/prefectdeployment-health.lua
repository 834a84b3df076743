-- Argo CD health check for prefect.io/PrefectDeployment.
-- Written for Argo CD's Lua 5.1 dialect (gopher-lua): no goto, no integer division.
-- It reads the same kstatus conditions Flux reads:
--   Healthy      Ready=True for the current generation
--   Degraded     Stalled=True: only a person can move it on (invalid spec, conflict,
--                a request Prefect refuses)
--   Progressing  anything else: not reconciled yet, a newer spec pending, a failure
--                being retried (Reconciling=True), or the resource being deleted
local hs = { status = "Progressing", message = "Waiting for the operator" }

-- Status written by operator versions before the Stalled condition existed.
local stalled_reasons = {
  InvalidSpec = true,
  Conflict = true,
  PrefectRejected = true,
  AutomationFailed = true,
}

local function find(conditions, type_)
  for _, c in ipairs(conditions) do
    if c.type == type_ then
      return c
    end
  end
  return nil
end

local function say(c)
  return (c.reason or "Unknown") .. ": " .. (c.message or "")
end

if obj.metadata ~= nil and obj.metadata.deletionTimestamp ~= nil then
  hs.message = "Being deleted"
  if obj.status ~= nil and obj.status.conditions ~= nil then
    local ready = find(obj.status.conditions, "Ready")
    if ready ~= nil and ready.message ~= nil and ready.message ~= "" then
      hs.message = "Being deleted: " .. ready.message
    end
  end
  return hs
end

if obj.status == nil or obj.status.conditions == nil then
  return hs
end

local generation = obj.metadata and obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and observed ~= nil and observed < generation then
  hs.message = "The operator has not processed the latest spec yet"
  return hs
end

local conditions = obj.status.conditions
local ready = find(conditions, "Ready")
local stalled = find(conditions, "Stalled")
local reconciling = find(conditions, "Reconciling")

if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = say(stalled)
elseif ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or ""
elseif reconciling ~= nil and reconciling.status == "True" then
  hs.message = say(reconciling)
elseif ready ~= nil then
  if ready.status == "False" and stalled_reasons[ready.reason] then
    hs.status = "Degraded"
  end
  hs.message = say(ready)
end
return hs
