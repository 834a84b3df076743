//! Bulk reads for drift checks. Per Prefect server (and credentials), the deployments
//! the operator manages are read in pages of 200 ids (`POST /deployments/filter`;
//! Prefect's filter has no label filter, so the ids recorded in status are the key),
//! and every drift check plans against that snapshot. A resource whose deployment the
//! snapshot shows as it should be costs no request at all; where the snapshot shows a
//! difference, or lacks the deployment, the pass reads it directly before writing.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::observed::ObservedDeployment;
use crate::prefect::PrefectClient;
use crate::Result;

const PAGE: usize = 200;

/// The snapshots of every server, by client identity.
#[derive(Default)]
pub struct Snapshots {
    servers: Mutex<HashMap<String, Arc<Server>>>,
}

#[derive(Default)]
struct Server {
    /// The deployment ids resources recorded for this server.
    ids: Mutex<HashSet<String>>,
    /// The last read and when it was taken; the async lock makes concurrent passes
    /// wait for one read instead of each making their own.
    data: tokio::sync::Mutex<Option<(Instant, HashMap<String, ObservedDeployment>)>>,
}

impl Snapshots {
    fn server(&self, client: &PrefectClient) -> Arc<Server> {
        let mut map = self.servers.lock().expect("snapshots lock");
        map.entry(client.identity()).or_default().clone()
    }

    /// Remembers that a resource manages deployment `id` on this client's server.
    pub fn register(&self, client: &PrefectClient, id: &str) {
        let server = self.server(client);
        server
            .ids
            .lock()
            .expect("snapshot ids lock")
            .insert(id.to_string());
    }

    /// Forgets a deployment (its resource is gone or points elsewhere now).
    pub fn forget(&self, client: &PrefectClient, id: &str) {
        let server = self.server(client);
        server.ids.lock().expect("snapshot ids lock").remove(id);
    }

    /// Deployment `id` as the server's snapshot holds it, reading the snapshot anew when
    /// it is older than `max_age`. `Ok(None)`: the server does not have it (or it was
    /// never registered): the caller reads it directly.
    pub async fn lookup(
        &self,
        client: &PrefectClient,
        id: &str,
        max_age: Duration,
    ) -> Result<Option<ObservedDeployment>> {
        let server = self.server(client);
        let mut data = server.data.lock().await;
        let fresh = data.as_ref().is_some_and(|(at, _)| at.elapsed() < max_age);
        if !fresh {
            let ids: Vec<String> = {
                let set = server.ids.lock().expect("snapshot ids lock");
                set.iter().cloned().collect()
            };
            let mut all = HashMap::with_capacity(ids.len());
            for chunk in ids.chunks(PAGE) {
                for d in client.read_deployments(chunk).await? {
                    all.insert(d.id.clone(), d);
                }
            }
            *data = Some((Instant::now(), all));
        }
        Ok(data.as_ref().and_then(|(_, all)| all.get(id).cloned()))
    }
}
