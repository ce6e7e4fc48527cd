//! Leader election on a `coordination.k8s.io` Lease, so that of several
//! operator replicas exactly one writes. Acquire and renew are updates with
//! the Lease's resourceVersion: two replicas racing get one 409.
//!
//! As in client-go, a leader keeps retrying a failed or conflicting renewal
//! until its renew deadline, which is shorter than the lease duration, so it
//! has stopped writing before any other replica may take the lease.

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
    /// A leader that has not renewed for this long steps down; must be
    /// shorter than `lease_duration`.
    pub renew_deadline: Duration,
    pub renew_every: Duration,
    /// Pause between retries of a failed renewal.
    pub retry_every: Duration,
}

impl LeaderConfig {
    /// client-go's proportions: lease 15 s, renew deadline 10 s, renewals
    /// every 3 s (kube-controller-manager renews every 2 s), retries every 1 s.
    pub fn with_defaults(namespace: String, lease_name: String, identity: String) -> Self {
        Self {
            namespace,
            lease_name,
            identity,
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            renew_every: Duration::from_secs(3),
            retry_every: Duration::from_secs(1),
        }
    }
}

/// What one attempt decided.
#[derive(Debug, PartialEq)]
enum Attempt {
    Leading,
    Following(String),
    /// Our write lost a race (409): read again and retry. It does not mean
    /// another replica leads: the conflicting write may have been our own
    /// earlier renewal whose answer was lost.
    Conflict,
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
            match api.create(&post_params(), &lease).await {
                Ok(_) => Ok(Attempt::Leading),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Conflict),
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
            match api.replace(&cfg.lease_name, &post_params(), &lease).await {
                Ok(_) => Ok(Attempt::Leading),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Conflict),
                Err(e) => Err(e),
            }
        }
    }
}

/// What the loop does after an attempt (pure, so the step-down rule is tested).
#[derive(Debug, PartialEq)]
enum Next {
    /// Leading; renew after `renew_every`.
    Lead,
    /// Not leading; try again after `renew_every`.
    StandBy,
    /// The attempt failed; retry after `retry_every`.
    Retry,
    /// Stop writing: another replica holds the lease, or we could not renew
    /// before the renew deadline.
    StepDown,
}

fn decide(
    outcome: &Result<Attempt, String>,
    leading: bool,
    since_renewal: Option<Duration>,
    cfg: &LeaderConfig,
) -> Next {
    match outcome {
        Ok(Attempt::Leading) => Next::Lead,
        Ok(Attempt::Following(_)) if leading => Next::StepDown,
        Ok(Attempt::Following(_)) => Next::StandBy,
        Ok(Attempt::Conflict) | Err(_) if !leading => Next::StandBy,
        Ok(Attempt::Conflict) | Err(_) => {
            if since_renewal.is_some_and(|d| d >= cfg.renew_deadline) {
                Next::StepDown
            } else {
                Next::Retry
            }
        }
    }
}

/// Runs until leadership is lost: sends `true` once this replica leads; when
/// another replica holds the lease, or renewals keep failing past the renew
/// deadline, sends `false` (the caller must stop writing) and returns.
pub async fn run(client: kube::Client, cfg: LeaderConfig, leading: watch::Sender<bool>) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut last_renewed: Option<tokio::time::Instant> = None;
    loop {
        // The renewal counts from before the request (the Lease says "renewed
        // now" from then on), and a request may not outlive the renew
        // deadline: a hung API call must not keep a stale leader writing.
        let sent = tokio::time::Instant::now();
        let is_leading = *leading.borrow();
        let budget = match (is_leading, last_renewed) {
            (true, Some(t)) => cfg.renew_deadline.saturating_sub(t.elapsed()),
            _ => cfg.renew_deadline,
        };
        let outcome = match tokio::time::timeout(budget, attempt(&api, &cfg)).await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {budget:?}")),
        };
        let next = decide(&outcome, is_leading, last_renewed.map(|t| t.elapsed()), &cfg);
        let pause = match next {
            Next::Lead => {
                if !is_leading {
                    tracing::info!(identity = %cfg.identity, lease = %cfg.lease_name, "became leader");
                }
                last_renewed = Some(sent);
                let _ = leading.send(true);
                cfg.renew_every
            }
            Next::StandBy => {
                tracing::debug!(?outcome, "standing by");
                cfg.renew_every
            }
            Next::Retry => {
                tracing::warn!(
                    ?outcome,
                    "renewing the leader lease failed; retrying before the renew deadline"
                );
                cfg.retry_every
            }
            Next::StepDown => {
                tracing::error!(?outcome, "lost the leader lease; stepping down");
                let _ = leading.send(false);
                return;
            }
        };
        tokio::time::sleep(pause).await;
    }
}

/// Writes of the leader Lease name their field manager, so managedFields
/// show who holds it (the operator's, not an anonymous writer).
fn post_params() -> PostParams {
    PostParams {
        field_manager: Some(zerocopy_api::labels::OPERATOR_MANAGER.into()),
        ..PostParams::default()
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

    #[test]
    fn a_leader_retries_conflicts_and_errors_until_its_renew_deadline() {
        let cfg = LeaderConfig::with_defaults("ns".into(), "l".into(), "a".into());
        let conflict = Ok(Attempt::Conflict);
        let error = Err("timeout".to_string());
        for outcome in [&conflict, &error] {
            assert_eq!(decide(outcome, true, Some(Duration::from_secs(4)), &cfg), Next::Retry);
            assert_eq!(
                decide(outcome, true, Some(Duration::from_secs(10)), &cfg),
                Next::StepDown
            );
            assert_eq!(decide(outcome, false, None, &cfg), Next::StandBy);
        }
        assert_eq!(
            decide(
                &Ok(Attempt::Following("b".into())),
                true,
                Some(Duration::from_secs(1)),
                &cfg
            ),
            Next::StepDown,
            "another holder of a live lease means we lost it"
        );
        assert_eq!(decide(&Ok(Attempt::Leading), false, None, &cfg), Next::Lead);
        assert!(
            cfg.renew_deadline < cfg.lease_duration,
            "a leader stops before the lease can be taken"
        );
    }
}
