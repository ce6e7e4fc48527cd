//! Leader election on a `coordination.k8s.io` Lease, so that of several
//! operator replicas exactly one writes. Acquire and renew are updates with
//! the Lease's resourceVersion: two replicas racing get one 409.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use tokio::sync::watch;

#[derive(Clone, Debug)]
pub struct LeaderConfig {
    pub namespace: String,
    pub lease_name: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
}

/// What one attempt decided.
#[derive(Debug, PartialEq)]
enum Attempt {
    Leading,
    Following(String),
}

/// Whether `identity` may take or keep the lease now (pure).
pub fn may_hold(lease: &Lease, identity: &str, now: Timestamp) -> bool {
    let Some(spec) = &lease.spec else { return true };
    if spec
        .holder_identity
        .as_deref()
        .is_none_or(|h| h.is_empty() || h == identity)
    {
        return true;
    }
    let (Some(renew), Some(secs)) = (&spec.renew_time, spec.lease_duration_seconds) else {
        return true;
    };
    renew
        .0
        .checked_add(SignedDuration::from_secs(i64::from(secs)))
        .is_ok_and(|expiry| expiry <= now)
}

async fn attempt(api: &Api<Lease>, cfg: &LeaderConfig) -> Result<Attempt, kube::Error> {
    let now = Timestamp::now();
    let fresh_spec = |transitions: i32, acquire: Option<MicroTime>| LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(cfg.lease_duration.as_secs() as i32),
        renew_time: Some(MicroTime(now)),
        acquire_time: acquire.or(Some(MicroTime(now))),
        lease_transitions: Some(transitions),
        ..Default::default()
    };
    match api.get_opt(&cfg.lease_name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.lease_name.clone()),
                    ..Default::default()
                },
                spec: Some(fresh_spec(0, None)),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Leading),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Following(String::new())),
                Err(e) => Err(e),
            }
        }
        Some(mut lease) => {
            if !may_hold(&lease, &cfg.identity, now) {
                let holder = lease.spec.and_then(|s| s.holder_identity).unwrap_or_default();
                return Ok(Attempt::Following(holder));
            }
            let spec = lease.spec.clone().unwrap_or_default();
            let ours = spec.holder_identity.as_deref() == Some(cfg.identity.as_str());
            let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!ours);
            lease.spec = Some(fresh_spec(transitions, if ours { spec.acquire_time } else { None }));
            match api.replace(&cfg.lease_name, &PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Leading),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Following(String::new())),
                Err(e) => Err(e),
            }
        }
    }
}

/// Runs forever: sends `true` once this replica leads; if it then fails to
/// renew for a whole lease duration, sends `false` (the caller must stop writing).
pub async fn run(client: kube::Client, cfg: LeaderConfig, leading: watch::Sender<bool>) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut last_renewed: Option<tokio::time::Instant> = None;
    loop {
        match attempt(&api, &cfg).await {
            Ok(Attempt::Leading) => {
                if !*leading.borrow() {
                    tracing::info!(identity = %cfg.identity, lease = %cfg.lease_name, "became leader");
                }
                last_renewed = Some(tokio::time::Instant::now());
                let _ = leading.send(true);
            }
            Ok(Attempt::Following(holder)) => {
                if *leading.borrow() {
                    tracing::error!(%holder, "lost the leader lease");
                    let _ = leading.send(false);
                    return;
                }
                tracing::debug!(%holder, "standing by");
            }
            Err(e) => {
                tracing::warn!(error = %e, "leader election request failed");
                if *leading.borrow() && last_renewed.is_some_and(|t| t.elapsed() >= cfg.lease_duration) {
                    tracing::error!("could not renew the leader lease in time; stepping down");
                    let _ = leading.send(false);
                    return;
                }
            }
        }
        tokio::time::sleep(cfg.renew_every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, renewed_secs_ago: i64) -> Lease {
        let now = Timestamp::now();
        Lease {
            metadata: Default::default(),
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_duration_seconds: Some(15),
                renew_time: Some(MicroTime(
                    now.checked_sub(SignedDuration::from_secs(renewed_secs_ago)).unwrap(),
                )),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn only_the_holder_renews_a_live_lease() {
        let now = Timestamp::now();
        assert!(may_hold(&lease("a", 3), "a", now));
        assert!(!may_hold(&lease("a", 3), "b", now));
        assert!(may_hold(&lease("a", 30), "b", now), "an expired lease can be taken");
        assert!(may_hold(&Lease::default(), "b", now));
    }
}
