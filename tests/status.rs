//! The conditions each outcome writes, read the way Flux reads them (kstatus). No
//! servers: the table below is the contract.

mod support;

use prefect_operator::api::PrefectDeploymentStatus;
use prefect_operator::plan::SyncState;
use prefect_operator::reconcile::status::{self, Outcome};
use prefect_operator::Error;
use serde_json::{json, Value};

fn object(generation: i64, st: PrefectDeploymentStatus) -> Value {
    json!({
        "apiVersion": "prefect.io/v1", "kind": "PrefectDeployment",
        "metadata": {"name": "a", "generation": generation},
        "status": st,
    })
}

fn status_for(outcome: Outcome, generation: i64) -> PrefectDeploymentStatus {
    let conditions = status::conditions(None, outcome, Some(generation));
    status::build(
        &SyncState::default(),
        conditions,
        Some(generation),
        (None, None),
    )
}

#[test]
fn every_outcome_reads_as_kstatus_expects() {
    let kube = Error::Kube(kube::Error::LinesCodecMaxLineLengthExceeded);
    // (error, kstatus after a failed pass)
    let table: Vec<(Error, &str)> = vec![
        (Error::InvalidSpec("spec.x: bad".into()), "Failed"),
        (Error::Conflict("taken".into()), "Failed"),
        (
            Error::PrefectRejected("POST deployments: 422".into()),
            "Failed",
        ),
        (Error::AutomationFailed("trigger refused".into()), "Failed"),
        (
            Error::PrefectUnauthorized("POST flows: 401".into()),
            "Failed",
        ),
        (Error::ServerNotAllowed("not allowed".into()), "Failed"),
        (Error::SecretNotAllowed("no label".into()), "Failed"),
        (Error::PrefectUnreachable("503".into(), None), "InProgress"),
        (Error::SecretNotFound("no secret".into()), "InProgress"),
        (Error::WorkPoolNotFound("no pool".into()), "InProgress"),
        (Error::Internal("panic".into()), "InProgress"),
        (kube, "InProgress"),
    ];
    for (e, want) in &table {
        let message = e.to_string();
        let st = status_for(Outcome::failed(e, &message), 3);
        let obj = object(3, st.clone());
        assert_eq!(support::kstatus(&obj), *want, "{e:?}: {:?}", st.conditions);
        // Every condition carries the generation it describes, and Ready is False.
        assert!(st
            .conditions
            .iter()
            .all(|c| c.observed_generation == Some(3)));
        assert_eq!(st.observed_generation, Some(3));
        let ready = st.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", e.reason())
        );
    }

    // Success: Current, with neither Reconciling nor Stalled.
    let ok = status_for(Outcome::Ready { message: "applied" }, 3);
    assert_eq!(support::kstatus(&object(3, ok.clone())), "Current");
    assert_eq!(ok.conditions.len(), 1);
    // A newer spec not yet processed: in progress whatever the conditions say.
    assert_eq!(support::kstatus(&object(4, ok.clone())), "InProgress");
    // Being deleted.
    let mut deleting = object(3, ok);
    deleting["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    assert_eq!(support::kstatus(&deleting), "Terminating");
}

#[test]
fn conditions_keep_their_transition_time_while_unchanged() {
    let e = Error::Conflict("taken".into());
    let message = e.to_string();
    let first = status_for(Outcome::failed(&e, &message), 1);
    let mut old = first.clone();
    for c in &mut old.conditions {
        c.last_transition_time = "2020-01-01T00:00:00Z".into();
    }
    let again = status::conditions(Some(&old), Outcome::failed(&e, &message), Some(1));
    assert!(again
        .iter()
        .all(|c| c.last_transition_time == "2020-01-01T00:00:00Z"));
    // Recovering: Ready flips (new time), Stalled goes away.
    let ok = status::conditions(Some(&old), Outcome::Ready { message: "ok" }, Some(1));
    assert_eq!(ok.len(), 1);
    assert_ne!(ok[0].last_transition_time, "2020-01-01T00:00:00Z");
}
