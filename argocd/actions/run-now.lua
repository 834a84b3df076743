-- Asks for one flow run of the deployment: each new token makes exactly one run.
if obj.metadata.annotations == nil then
  obj.metadata.annotations = {}
end
obj.metadata.annotations["prefect.io/run-requested-at"] = os.date("!%Y-%m-%dT%H:%M:%SZ")
return obj
