//! The ModelWrapper controller: placement → ModelReplicas (server-side
//! apply, owner = the wrapper), ready labels on nodes, status aggregated from
//! the replicas, Events on phase changes. Reads come from the caches; a
//! reconcile writes only what differs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::{Resource, ResourceExt};
use serde_json::json;
use zerocopy_api::format::generation_digest;
use zerocopy_api::labels::{
    ready_label, replica_name, NODE_LABEL, OPERATOR_MANAGER, UPLOAD_TOKEN_ANNOTATION, WRAPPER_LABEL,
};
use zerocopy_api::{validate_wrapper, ModelReplica, ModelReplicaSpec, ModelWrapper, ModelWrapperStatus, ReplicaPhase};

use crate::context::{Context, Error};
use crate::lenient::Lenient;
use crate::placement::{
    capacity_avoid, place, remember, CapacityFailure, CapacityMemory, CAPACITY_ANNOTATION, CAPACITY_REASON,
};
use crate::status::{aggregate, condition, set_condition};

/// The finalizer earlier versions put on every ModelWrapper to remove its
/// node label on deletion. It wedged `kubectl delete` (and namespace
/// deletion) once the operator was uninstalled with the CRDs kept, so labels
/// are now swept instead ([`sweep_labels`]) and this finalizer is only
/// removed where it is still found.
pub const LEGACY_FINALIZER: &str = "zerocopy.dev/node-labels";

/// How often a wrapper is re-checked without any event: agent Leases expire silently.
pub const RESYNC: Duration = Duration::from_secs(10);

pub async fn reconcile(w: Arc<Lenient<ModelWrapper>>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = w.namespace().ok_or(Error::NoNamespace)?;
    // The replica cache fills beside the controller: a wrapper must never
    // see "no replicas" because it is still filling.
    if !ctx.caches.replicas_ready.wait().await {
        return Err(Error::CacheStopped("ModelReplica"));
    }
    let result = async {
        if w.finalizers().iter().any(|f| f == LEGACY_FINALIZER) {
            if w.meta().deletion_timestamp.is_some() {
                sync_labels(&ctx, &ready_label(&ns, &w.name_any()), &[]).await?;
            }
            remove_legacy_finalizer(&ctx, &ns, &w).await?;
        }
        if w.meta().deletion_timestamp.is_some() {
            return Ok(Action::await_change());
        }
        match &w.parsed {
            Ok(parsed) => apply(parsed, &ctx).await,
            Err(why) => report_malformed(&w, why, &ctx).await,
        }
    }
    .await;
    ctx.metrics
        .reconcile_seconds
        .with_label_values(&["modelwrapper"])
        .observe(started.elapsed().as_secs_f64());
    ctx.metrics
        .reconciles
        .with_label_values(&["modelwrapper", if result.is_ok() { "ok" } else { "error" }])
        .inc();
    result
}

/// Parameters of the operator's non-apply writes (node labels, the legacy
/// finalizer): its own field manager, so managedFields name the operator as
/// the owner (without one the server records the client's User-Agent prefix,
/// empty for a kube-rs client that sets none).
fn update_params() -> PatchParams {
    PatchParams {
        field_manager: Some(OPERATOR_MANAGER.into()),
        ..Default::default()
    }
}

/// Removes [`LEGACY_FINALIZER`] with a JSON patch that tests its position,
/// so a concurrent change to the list fails (409/422) instead of dropping
/// another controller's finalizer.
async fn remove_legacy_finalizer(ctx: &Context, ns: &str, w: &Lenient<ModelWrapper>) -> Result<(), Error> {
    let Some(i) = w.finalizers().iter().position(|f| f == LEGACY_FINALIZER) else {
        return Ok(());
    };
    let api: Api<Lenient<ModelWrapper>> = Api::namespaced(ctx.client.clone(), ns);
    let patch: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": format!("/metadata/finalizers/{i}"), "value": LEGACY_FINALIZER},
        {"op": "remove", "path": format!("/metadata/finalizers/{i}")}
    ]))?;
    match api
        .patch(&w.name_any(), &update_params(), &Patch::Json::<()>(patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Removes ready labels of wrappers that no longer exist: labels are not
/// owned objects, and deletion needs no finalizer (a finalizer would wedge
/// deletes whenever the operator is not running). Candidates come from the
/// caches; only when there are any is the list of wrappers read live, so a
/// cache that is still filling can never make a live wrapper's label go.
pub async fn sweep_labels(ctx: &Context) -> Result<usize, Error> {
    let expected = |wrappers: Vec<(String, String)>| -> std::collections::BTreeSet<String> {
        wrappers.iter().map(|(ns, name)| ready_label(ns, name)).collect()
    };
    let stale_on = |n: &Node, expected: &std::collections::BTreeSet<String>| -> Vec<String> {
        n.labels()
            .keys()
            .filter(|k| k.starts_with(zerocopy_api::labels::READY_LABEL_PREFIX) && !expected.contains(*k))
            .cloned()
            .collect()
    };
    let cached = expected(
        ctx.caches
            .wrappers
            .state()
            .iter()
            .filter_map(|w| Some((w.namespace()?, w.name_any())))
            .collect(),
    );
    let nodes = ctx.caches.nodes.state();
    if nodes.iter().all(|n| stale_on(n, &cached).is_empty()) {
        return Ok(0);
    }
    let live: Api<Lenient<ModelWrapper>> = Api::all(ctx.client.clone());
    let live = expected(
        live.list(&Default::default())
            .await?
            .items
            .iter()
            .filter_map(|w| Some((w.namespace()?, w.name_any())))
            .collect(),
    );
    let api: Api<Node> = Api::all(ctx.client.clone());
    let mut removed = 0;
    for n in &nodes {
        let stale: serde_json::Map<String, serde_json::Value> = stale_on(n, &live)
            .into_iter()
            .map(|k| (k, serde_json::Value::Null))
            .collect();
        if stale.is_empty() {
            continue;
        }
        removed += stale.len();
        match api
            .patch(
                &n.name_any(),
                &update_params(),
                &Patch::Merge(json!({"metadata": {"labels": stale}})),
            )
            .await
        {
            Ok(_) => ctx.metrics.write("Node", "patch"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(removed)
}

pub fn error_policy(_w: Arc<Lenient<ModelWrapper>>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(%error, "ModelWrapper reconcile failed; retrying");
    Action::requeue(Duration::from_secs(2))
}

fn desired_replica(w: &ModelWrapper, ns: &str, node: &str, digest: &str) -> serde_json::Value {
    let spec = ModelReplicaSpec {
        wrapper: w.name_any(),
        node: node.into(),
        generation: digest.into(),
        mode: w.spec.mode,
        pipeline: w.spec.pipeline.clone(),
        memory: w.spec.memory.clone(),
    };
    // Who may upload the wrapper's `upload:` sources, for the node's agent.
    let annotations: BTreeMap<&str, &String> = w
        .annotations()
        .get(UPLOAD_TOKEN_ANNOTATION)
        .map(|t| (UPLOAD_TOKEN_ANNOTATION, t))
        .into_iter()
        .collect();
    json!({
        "apiVersion": "zerocopy.dev/v1alpha1",
        "kind": "ModelReplica",
        "metadata": {
            "name": replica_name(&w.name_any(), node),
            "namespace": ns,
            "labels": {NODE_LABEL: node, WRAPPER_LABEL: w.name_any()},
            "annotations": annotations,
            "ownerReferences": [w.controller_owner_ref(&())],
        },
        "spec": spec,
    })
}

async fn apply(w: &ModelWrapper, ctx: &Context) -> Result<Action, Error> {
    let ns = w.namespace().ok_or(Error::NoNamespace)?;
    let name = w.name_any();
    let now = Time(Timestamp::now());
    let previous = w.status.clone();

    if let Err(errors) = validate_wrapper(&ns, &name, &w.spec, zerocopy_api::Pinning::Required) {
        // Invalid specs change nothing on the nodes; the status says what to fix.
        let mut status = previous.clone().unwrap_or_default();
        status.phase = Some("Failed".into());
        status.observed_generation = w.metadata.generation;
        set_condition(
            &mut status.conditions,
            condition(
                "Ready",
                false,
                "InvalidSpec",
                errors.to_string(),
                w.metadata.generation,
                &now,
            ),
        );
        write_status(ctx, w, previous.as_ref(), status).await?;
        return Ok(Action::await_change());
    }

    let digest = generation_digest(&w.spec);
    let label = ready_label(&ns, &name);
    let uid = w.uid().unwrap_or_default();
    // This wrapper's replicas only, from the index: O(its nodes), not O(all replicas).
    let mine: Vec<Arc<ModelReplica>> = ctx
        .replicas_of(&ns, &name)
        .into_iter()
        .filter(|r| r.owner_references().iter().any(|o| o.uid == uid))
        .collect();
    let by_node: HashMap<&str, &Arc<ModelReplica>> = mine.iter().map(|r| (r.spec.node.as_str(), r)).collect();
    let current_nodes: Vec<String> = mine.iter().map(|r| r.spec.node.clone()).collect();
    let bytes = mine
        .iter()
        .filter_map(|r| r.status.as_ref())
        .map(|s| s.bytes_total)
        .max()
        .unwrap_or(0);
    let selector_keys: Vec<&String> = w.spec.node_selector.keys().collect();
    let nodes = ctx.node_infos(Timestamp::now(), &selector_keys);
    // Re-placement: nodes where this generation failed for lack of capacity.
    let remembered = CapacityMemory::parse(w.annotations().get(CAPACITY_ANNOTATION).map(String::as_str));
    let avoid = capacity_avoid(&remembered, &digest, &capacity_failures(&mine, &digest), &nodes);
    let placement = place(
        &w.spec.node_selector,
        bytes,
        &nodes,
        &current_nodes,
        ctx.opts.node_grace,
        (w.spec.placement == zerocopy_api::Placement::Consumers)
            .then(|| crate::placement::Follow {
                namespace: ns.clone(),
                name: name.clone(),
            })
            .as_ref(),
        &avoid,
    );
    // Remember the nodes left before removing their replicas, so that a
    // restart in between cannot place the wrapper there again.
    let memory = remember(&digest, &avoid, &placement);
    let memory = (!memory.nodes.is_empty()).then_some(memory);
    let had = w.annotations().contains_key(CAPACITY_ANNOTATION);
    if memory.as_ref() != (had.then_some(&remembered)) {
        for (node, _) in memory.iter().flat_map(|m| &m.nodes) {
            if !remembered.nodes.contains_key(node) || remembered.generation != digest {
                tracing::info!(wrapper = %format!("{ns}/{name}"), %node, "leaving the node after repeated InsufficientCapacity failures");
            }
        }
        write_capacity_memory(ctx, &ns, &name, memory.as_ref()).await?;
    }

    // Replicas: apply what differs, delete what is no longer placed.
    let replicas: Api<ModelReplica> = Api::namespaced(ctx.client.clone(), &ns);
    // Compared field by field: building and serializing the desired object
    // for each of 1,000 nodes on every reconcile would cost more than the rest.
    let token = w.annotations().get(UPLOAD_TOKEN_ANNOTATION);
    for node in &placement.nodes {
        let same = by_node.get(node.as_str()).is_some_and(|r| {
            r.spec.node == *node
                && r.spec.wrapper == name
                && r.spec.generation == digest
                && r.spec.mode == w.spec.mode
                && r.spec.pipeline == w.spec.pipeline
                && r.spec.memory == w.spec.memory
                && r.labels().get(NODE_LABEL) == Some(node)
                && r.annotations().get(UPLOAD_TOKEN_ANNOTATION) == token
        });
        if !same {
            let desired = desired_replica(w, &ns, node, &digest);
            let rname = replica_name(&name, node);
            replicas
                .patch(
                    &rname,
                    &PatchParams::apply(OPERATOR_MANAGER).force(),
                    &Patch::Apply(&desired),
                )
                .await?;
            ctx.metrics.write("ModelReplica", "apply");
        }
    }
    let placed: HashSet<&str> = placement.nodes.iter().map(String::as_str).collect();
    for r in mine.iter().filter(|r| !placed.contains(r.spec.node.as_str())) {
        if r.metadata.deletion_timestamp.is_none() {
            match replicas.delete(&r.name_any(), &DeleteParams::background()).await {
                Ok(_) => ctx.metrics.write("ModelReplica", "delete"),
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    let mine_now: Vec<ModelReplica> = mine.iter().map(|r| (**r).clone()).collect();
    let status = aggregate(
        previous.as_ref(),
        w.metadata.generation,
        &digest,
        &label,
        &placement,
        &mine_now,
        &now,
    );
    // A node kept through an outage keeps its copy but not its label: pods
    // sent there would wait for a mount its dead agent cannot give.
    let down: Vec<&String> = placement
        .kept
        .iter()
        .filter(|(_, why)| *why != crate::placement::Excluded::Unschedulable)
        .map(|(n, _)| n)
        .collect();
    let ready_nodes: Vec<String> = crate::status::tally(&placement.nodes, &digest, &mine_now)
        .ready
        .into_iter()
        .filter(|n| !down.contains(&n))
        .collect();
    sync_labels(ctx, &label, &ready_nodes).await?;
    write_status(ctx, w, previous.as_ref(), status).await?;
    Ok(Action::requeue(RESYNC))
}

/// This generation's replicas that failed for lack of capacity, with their attempts.
fn capacity_failures(mine: &[Arc<ModelReplica>], digest: &str) -> Vec<CapacityFailure> {
    mine.iter()
        .filter(|r| r.spec.generation == digest)
        .filter_map(|r| {
            let s = r.status.as_ref()?;
            (s.phase == ReplicaPhase::Failed
                && s.generation.as_deref() == Some(digest)
                && s.reason.as_deref() == Some(CAPACITY_REASON))
            .then(|| CapacityFailure {
                node: r.spec.node.clone(),
                attempts: s.attempts.unwrap_or(1),
            })
        })
        .collect()
}

/// Writes (or removes, with `None`) the [`CAPACITY_ANNOTATION`] memory.
async fn write_capacity_memory(
    ctx: &Context,
    ns: &str,
    name: &str,
    memory: Option<&CapacityMemory>,
) -> Result<(), Error> {
    let value = match memory {
        Some(m) => json!(serde_json::to_string(m)?),
        None => serde_json::Value::Null,
    };
    let api: Api<Lenient<ModelWrapper>> = Api::namespaced(ctx.client.clone(), ns);
    match api
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {CAPACITY_ANNOTATION: value}}})),
        )
        .await
    {
        Ok(_) => ctx.metrics.write("ModelWrapper", "patch"),
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// Ready label on exactly `ready_nodes`; JSON merge patches touch only this label.
async fn sync_labels(ctx: &Context, label: &str, ready_nodes: &[String]) -> Result<(), Error> {
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let ready_nodes: HashSet<&str> = ready_nodes.iter().map(String::as_str).collect();
    for n in ctx.caches.nodes.state() {
        let name = n.name_any();
        let has = n.labels().contains_key(label);
        let want = ready_nodes.contains(name.as_str());
        if has == want {
            continue;
        }
        let value = if want { json!("true") } else { json!(null) };
        match nodes
            .patch(
                &name,
                &update_params(),
                &Patch::Merge(json!({"metadata": {"labels": {label: value}}})),
            )
            .await
        {
            Ok(_) => ctx.metrics.write("Node", "patch"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

async fn write_status(
    ctx: &Context,
    w: &ModelWrapper,
    previous: Option<&ModelWrapperStatus>,
    status: ModelWrapperStatus,
) -> Result<(), Error> {
    if previous == Some(&status) {
        return Ok(());
    }
    let ns = w.namespace().ok_or(Error::NoNamespace)?;
    ctx.apply_status::<ModelWrapper>(&ns, &w.name_any(), &status).await?;
    let old_phase = previous.and_then(|p| p.phase.clone());
    if old_phase != status.phase {
        let phase = status.phase.clone().unwrap_or_default();
        let ready = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| c.message.clone())
            .unwrap_or_default();
        let event = KubeEvent {
            type_: if matches!(phase.as_str(), "Failed" | "Degraded") {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: phase.clone(),
            note: Some(format!("{} -> {phase}: {ready}", old_phase.as_deref().unwrap_or("New"))),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &w.object_ref(&())).await {
            tracing::warn!(error = %e, "could not record event");
        }
        tracing::info!(wrapper = %format!("{}/{}", w.namespace().unwrap_or_default(), w.name_any()), %phase, "phase changed");
    }
    Ok(())
}

/// An object that does not parse as a ModelWrapper: say so on its status and
/// change nothing on the nodes. The message is stable, so this writes once.
async fn report_malformed(w: &Lenient<ModelWrapper>, why: &str, ctx: &Context) -> Result<Action, Error> {
    let ns = w.namespace().ok_or(Error::NoNamespace)?;
    let message = format!("the object does not match the ModelWrapper schema: {why}");
    let raw = serde_json::to_value(w).unwrap_or_default();
    let current = raw["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
        .and_then(|c| c["message"].as_str().map(String::from));
    tracing::warn!(wrapper = %format!("{ns}/{}", w.name_any()), %why, "malformed ModelWrapper skipped");
    if current.as_deref() == Some(message.as_str()) {
        return Ok(Action::await_change());
    }
    let now = Time(Timestamp::now());
    let status = json!({"phase": "Failed", "observedGeneration": w.metadata.generation,
        "conditions": [condition("Ready", false, "MalformedObject", message, w.metadata.generation, &now)]});
    ctx.apply_status::<ModelWrapper>(&ns, &w.name_any(), &status).await?;
    Ok(Action::await_change())
}
