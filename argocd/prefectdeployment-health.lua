-- Argo CD health check for prefect.io/PrefectDeployment.
-- Written for Argo CD's Lua 5.1 dialect (gopher-lua): no goto, no integer division.
--   Healthy      Ready=True for the current generation
--   Degraded     Ready=False for a reason a person has to act on
--   Progressing  anything else: not reconciled yet, a newer spec pending, a transient
--                failure being retried, or the resource being deleted
local hs = { status = "Progressing", message = "Waiting for the operator" }

local needs_a_person = {
  InvalidSpec = true,
  Conflict = true,
  SecretNotFound = true,
  WorkPoolNotFound = true,
  PrefectRejected = true,
  AutomationFailed = true,
}

if obj.metadata ~= nil and obj.metadata.deletionTimestamp ~= nil then
  hs.message = "Being deleted"
  if obj.status ~= nil and obj.status.conditions ~= nil then
    for _, c in ipairs(obj.status.conditions) do
      if c.type == "Ready" and c.message ~= nil and c.message ~= "" then
        hs.message = "Being deleted: " .. c.message
      end
    end
  end
  return hs
end

if obj.status == nil or obj.status.conditions == nil then
  return hs
end

local ready = nil
for _, c in ipairs(obj.status.conditions) do
  if c.type == "Ready" then
    ready = c
  end
end
if ready == nil then
  return hs
end

local generation = obj.metadata and obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and observed ~= nil and observed < generation then
  hs.message = "The operator has not processed the latest spec yet"
  return hs
end

local message = ready.message or ""
if ready.status == "True" then
  hs.status = "Healthy"
  hs.message = message
elseif ready.status == "False" and needs_a_person[ready.reason] then
  hs.status = "Degraded"
  hs.message = (ready.reason or "") .. ": " .. message
else
  hs.message = (ready.reason or "Unknown") .. ": " .. message
end
return hs
