-- Asks the operator for a pass now (Flux's annotation; any new value works).
if obj.metadata.annotations == nil then
  obj.metadata.annotations = {}
end
obj.metadata.annotations["reconcile.fluxcd.io/requestedAt"] = os.date("!%Y-%m-%dT%H:%M:%SZ")
return obj
