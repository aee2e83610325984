//! `/api/v1/workflows`: graphs of jobs. A workflow is a [`WorkflowRecord`] in
//! `capstan_workflows` by id; this module checks a definition, stores it and starts its first
//! steps (`capstan_mesh::workflow::create`), shows it, and asks for its cancel; the schedulers
//! carry it forward as its steps' jobs end (`capstan_scheduler`'s `workflows`).
//!
//! Each step's job is checked as `POST /api/v1/jobs` checks a job (the same parser and the
//! same checks, its fields named `steps[<i>].job.<field>`), then as the job the step will
//! submit: with the workflow's metadata and the variables its dependencies hand on. The graph
//! is checked by the protocol (`WorkflowSpec::validate`: unique names, known dependencies, no
//! cycle), which names the path that is wrong. A workflow's steps are jobs submitted as its
//! creator, so its permissions are the jobs': `jobs:submit` to create one, `jobs:read` to see
//! them, `jobs:cancel:own` to cancel one's own and `jobs:cancel:any` another's. Creating and
//! cancelling are audited (`workflow.create`, `workflow.cancel`) with `workflow/<id>` as their
//! resource.

use capstan_protocol::spec::JobSpecWire;
use capstan_protocol::workflow::{
    MAX_STEPS, OUTPUT_TAIL_BYTES, STEP_KEY, StepSpec, StepStatus, WORKFLOW_KEY, WorkflowRecord,
    WorkflowSpec,
};
use capstan_protocol::{AuditAction, JobId, JobSpec, SpecError, Timestamp};
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, OpenApi};

use super::schedules::{Documented, ScheduleBody};
use super::{BearerAuth, Tag, served};
use crate::auth::Permission;
use crate::model::workflows::{
    Workflow, WorkflowInput, WorkflowInputWire, WorkflowList, WorkflowStatus, WorkflowSummary,
};
use crate::problem::ApiError;
use crate::submission::SubmissionBody;

/// The longest workflow name, in characters.
const MAX_NAME_CHARS: usize = 128;

/// The workflows operations.
pub(crate) struct WorkflowsApi(pub Option<std::sync::Arc<crate::State>>);

#[derive(ApiResponse)]
enum Created {
    /// Created: its first steps' jobs are submitted. `Location` is its URL.
    #[oai(status = 201)]
    Done(Json<Workflow>, #[oai(header = "Location")] String),
}

#[derive(ApiResponse)]
enum CancelResponse {
    /// Cancel asked, now or before, and the workflow as it stands: its running steps' jobs are
    /// being cancelled and its waiting steps skipped, but for the `always` ones.
    #[oai(status = 202)]
    Accepted(Json<Workflow>),
}

#[OpenApi(prefix_path = "/api/v1", tag = "Tag::Workflows")]
impl WorkflowsApi {
    /// List the workflows, newest first: those running, and those ended that have not expired
    /// (they expire with the finished jobs). Needs `jobs:read`.
    #[oai(path = "/workflows", method = "get", operation_id = "listWorkflows")]
    async fn list(
        &self,
        auth: BearerAuth,
        /// Only workflows in this status.
        status: Query<Option<WorkflowStatus>>,
    ) -> Result<Json<WorkflowList>, ApiError> {
        let state = served(&self.0)?;
        auth.allow_read(Permission::JobsRead)?;
        let wanted = status.0.map(WorkflowStatus::to_protocol);
        let mut records: Vec<WorkflowRecord> = state
            .mesh
            .workflows
            .values()
            .await?
            .into_iter()
            .map(|stored| stored.value)
            .filter(|record| wanted.is_none_or(|wanted| record.status == wanted))
            .collect();
        // Ids are ULIDs: among workflows created in the same millisecond, the later is greater.
        records.sort_by_key(|record| std::cmp::Reverse((record.created_at, record.id)));
        Ok(Json(WorkflowList {
            items: records.iter().map(WorkflowSummary::of).collect(),
        }))
    }

    /// Get a workflow: its graph, where it and each step stand, and each step's job id (read
    /// the jobs themselves at `GET /api/v1/jobs/{id}`). `404` when no workflow has that id.
    /// Needs `jobs:read`.
    #[oai(path = "/workflows/:id", method = "get", operation_id = "getWorkflow")]
    async fn get(&self, auth: BearerAuth, id: Path<String>) -> Result<Json<Workflow>, ApiError> {
        let state = served(&self.0)?;
        auth.allow_read(Permission::JobsRead)?;
        let record = existing(state, &id.0).await?;
        Ok(Json(Workflow::of(record)))
    }

    /// Create a workflow and start it.
    ///
    /// Each step's job is checked as `POST /api/v1/jobs` checks a job (a problem names the
    /// field as `steps[<i>].job.<field>`), and takes no `run_at`, `delay`, `idempotency_key`
    /// or `secrets`, and no `systems` or `nodes`. The graph must have 1 to 100 steps with
    /// unique names, dependencies that name steps, and no cycle (a problem names the path,
    /// such as `steps[0].depends_on`). A malformed body or a field of the wrong type is `400`,
    /// a definition that is wrong `422`; nothing is stored then. The steps that depend on
    /// nothing are submitted at once, as the caller, with `capstan.io/workflow` and
    /// `capstan.io/step` in their metadata, in the request's trace. Needs `jobs:submit`.
    #[oai(path = "/workflows", method = "post", operation_id = "createWorkflow")]
    async fn create(
        &self,
        auth: BearerAuth,
        body: ScheduleBody<WorkflowInputWire>,
    ) -> Result<Created, ApiError> {
        let state = served(&self.0)?;
        let id = JobId::generate();
        let caller = auth.allow(
            Permission::JobsSubmit,
            AuditAction::WorkflowCreate,
            Some(format!("workflow/{id}")),
        )?;
        let input = body.0;
        check_name(&input.name)?;
        if input.steps.is_empty() || input.steps.len() > MAX_STEPS {
            return Err(ApiError::invalid(
                format!("steps: 1 to {MAX_STEPS} steps, got {}", input.steps.len()),
                Some("steps".to_owned()),
            ));
        }
        let owner = caller.submitted_by();
        let mut steps = Vec::with_capacity(input.steps.len());
        for (index, step) in input.steps.into_iter().enumerate() {
            let job = checked_job(state, &auth, index, step.job, &owner.principal).await?;
            steps.push(StepSpec {
                name: step.name,
                job,
                depends_on: step.depends_on.unwrap_or_default(),
                when: step.when.unwrap_or_default(),
            });
        }
        let spec = WorkflowSpec {
            name: input.name,
            steps,
            fail_fast: input.fail_fast.unwrap_or(false),
        };
        spec.validate().map_err(invalid)?;
        let mut record = WorkflowRecord::new(id, spec, Timestamp::now());
        record.submitted_by = Some(owner);
        // The request's trace becomes the workflow's: every step's job joins it.
        record.traceparent = capstan_telemetry::propagation::traceparent();
        checked_steps(&record)?;
        let record = capstan_mesh::workflow::create(&state.mesh, &record).await?;
        auth.detail(describe(&record));
        Ok(Created::Done(
            Json(Workflow::of(record)),
            format!("/api/v1/workflows/{id}"),
        ))
    }

    /// Cancel a workflow.
    ///
    /// Its running steps' jobs are cancelled and its waiting steps skipped, but for the
    /// `always` steps, which still run; it ends `cancelled` once every step has ended. `202`
    /// with the workflow as it stands, also when a cancel was asked before and it has not
    /// ended yet; `409` when it had already ended; `404` when no workflow has that id. Needs
    /// `jobs:cancel:any`, or `jobs:cancel:own` for a workflow the caller created.
    #[oai(
        path = "/workflows/:id/cancel",
        method = "post",
        operation_id = "cancelWorkflow"
    )]
    async fn cancel(&self, auth: BearerAuth, id: Path<String>) -> Result<CancelResponse, ApiError> {
        let state = served(&self.0)?;
        let caller = auth.allow(
            Permission::JobsCancelOwn,
            AuditAction::WorkflowCancel,
            Some(resource(&id.0)),
        )?;
        let id = parse_id(&id.0)?;
        if !caller.can(Permission::JobsCancelAny) {
            let record = existing(state, &id.to_string()).await?;
            if !caller.owns(record.submitted_by.as_ref()) {
                return Err(auth.refuse(
                    Permission::JobsCancelAny,
                    format!(
                        "workflow {id} was created by `{}`; cancelling another's workflow \
                         needs `{}`",
                        record
                            .submitted_by
                            .map_or_else(|| "someone else".to_owned(), |by| by.principal),
                        Permission::JobsCancelAny
                    ),
                ));
            }
        }
        match capstan_mesh::workflow::cancel(&state.mesh, id).await? {
            None => Err(gone(&id.to_string())),
            Some((record, false)) if record.status.is_terminal() => Err(ApiError::conflict(
                format!("workflow {id} has ended: {}", record.status.as_str()),
            )),
            Some((record, asked)) => {
                auth.detail(if asked {
                    format!("cancel asked: {}", describe(&record))
                } else {
                    format!("a cancel was asked already: {}", describe(&record))
                });
                Ok(CancelResponse::Accepted(Json(Workflow::of(record))))
            }
        }
    }
}

impl Documented for WorkflowInputWire {
    type Document = WorkflowInput;
    const DESCRIPTION: &'static str = "The workflow to create.";
}

/// The audit record's resource for the workflow `id` as asked (cut to an id's length and a
/// bit: it is recorded before the id is parsed).
fn resource(id: &str) -> String {
    format!("workflow/{}", id.chars().take(64).collect::<String>())
}

/// `id` as a workflow's id; anything else names no workflow.
fn parse_id(id: &str) -> Result<JobId, ApiError> {
    id.parse().map_err(|_| gone(id))
}

fn gone(id: &str) -> ApiError {
    let shown: String = id.chars().take(64).collect();
    ApiError::not_found(format!("no workflow {shown}"))
}

/// Workflow `id`, or `404`.
async fn existing(state: &crate::State, id: &str) -> Result<WorkflowRecord, ApiError> {
    let id = parse_id(id)?;
    state
        .mesh
        .workflows
        .get(&id.to_string())
        .await?
        .map(|stored| stored.value)
        .ok_or_else(|| gone(&id.to_string()))
}

/// A definition that is wrong, as `422` naming the field.
fn invalid(error: SpecError) -> ApiError {
    ApiError::invalid(error.to_string(), Some(error.field))
}

/// Refuses a workflow name that is empty, blank, longer than [`MAX_NAME_CHARS`] or holds a
/// control character.
fn check_name(name: &str) -> Result<(), ApiError> {
    let length = name.chars().count();
    let reason = if length == 0 || name.trim().is_empty() {
        Some("must not be empty or blank".to_owned())
    } else if length > MAX_NAME_CHARS {
        Some(format!("at most {MAX_NAME_CHARS} characters, got {length}"))
    } else if name.chars().any(char::is_control) {
        Some("must not hold a control character".to_owned())
    } else {
        None
    };
    match reason {
        Some(reason) => Err(ApiError::invalid(
            format!("name: {reason}"),
            Some("name".to_owned()),
        )),
        None => Ok(()),
    }
}

/// `error`, a problem about a job, with its field named as step `index`'s
/// `steps[<index>].job.<field>`.
fn in_step(index: usize) -> impl Fn(ApiError) -> ApiError {
    move |mut error| {
        if let ApiError::BadRequest(problem)
        | ApiError::Invalid(problem)
        | ApiError::Forbidden(problem) = &mut error
            && let Some(field) = problem.0.field.as_mut()
        {
            *field = format!("steps[{index}].job.{field}");
        }
        error
    }
}

/// Step `index`'s job from its request, checked as `POST /api/v1/jobs` checks one submitted
/// by `owner`, and as a step's: one job, with no secret in clear and without the metadata
/// the workflow sets.
async fn checked_job(
    state: &crate::State,
    auth: &BearerAuth,
    index: usize,
    wire: JobSpecWire,
    owner: &str,
) -> Result<JobSpec, ApiError> {
    let field = |name: &str| Some(format!("steps[{index}].job.{name}"));
    // Secrets given in clear are sealed to one job's id; a step's job gets its id only when
    // the step starts, so the secret has to be stored and named instead.
    if wire.secrets.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid(
            "a step's job takes no `secrets` (they are sealed to a job whose id is chosen \
             when the step starts): store the secret (`POST /api/v1/secrets`) and name it in \
             `secret_refs`",
            field("secrets"),
        ));
    }
    // A fan-out's parent is not a job whose end a workflow can follow.
    for (given, name) in [
        (wire.systems.is_some(), "systems"),
        (wire.nodes.is_some(), "nodes"),
    ] {
        if given {
            return Err(ApiError::invalid(
                format!("a step runs one job, not a fan-out: give no `{name}`"),
                field(name),
            ));
        }
    }
    // No secret to seal: this is `POST /api/v1/jobs`'s check of the spec, and nothing else.
    let spec = SubmissionBody(wire)
        .seal_and_check(JobId::generate(), None)
        .map_err(in_step(index))?;
    if let Some(key) = spec
        .metadata
        .keys()
        .find(|key| key.as_str() == WORKFLOW_KEY || key.as_str() == STEP_KEY)
    {
        return Err(ApiError::invalid(
            format!("steps[{index}].job.metadata.{key}: is set by the workflow"),
            field(&format!("metadata.{key}")),
        ));
    }
    super::jobs::check_submission(state, auth, &spec, owner)
        .await
        .map_err(in_step(index))?;
    Ok(spec)
}

/// Refuses a workflow whose steps' jobs would be refused when they start: each step's job as
/// the workflow submits it (its metadata, and every variable its dependencies hand on, the
/// longest output included) must still be a valid job.
fn checked_steps(record: &WorkflowRecord) -> Result<(), ApiError> {
    let mut ended = record.clone();
    for step in &mut ended.steps {
        step.status = StepStatus::Succeeded;
        step.exit_code = Some(0);
        step.output = Some("x".repeat(OUTPUT_TAIL_BYTES));
    }
    for index in 0..ended.steps.len() {
        let run = JobSpecWire::from(ended.step_job(index));
        JobSpec::try_from(run).map_err(|error| in_step(index)(invalid(error)))?;
    }
    Ok(())
}

/// What the audit record says of a workflow: its name, its steps and where it stands, never
/// its jobs' arguments, environment or input.
fn describe(record: &WorkflowRecord) -> String {
    let names: Vec<&str> = record
        .spec
        .steps
        .iter()
        .map(|step| step.name.as_str())
        .collect();
    format!(
        "`{}`, {} steps ({}){}, {}",
        record.spec.name,
        names.len(),
        names.join(", "),
        if record.spec.fail_fast {
            ", fail fast"
        } else {
            ""
        },
        record.status.as_str()
    )
}

#[cfg(test)]
mod tests {
    use capstan_protocol::codec::{self, Encoding};
    use capstan_protocol::workflow::When;

    use super::*;

    fn record(env: &[(&str, &str)]) -> WorkflowRecord {
        let mut job: JobSpec =
            codec::decode_spec(Encoding::Json, br#"{"argv": ["/bin/true"]}"#).expect("a job");
        job.env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let step = |name: &str, depends_on: &[&str]| StepSpec {
            name: name.to_owned(),
            job: job.clone(),
            depends_on: depends_on.iter().map(|d| (*d).to_owned()).collect(),
            when: When::OnSuccess,
        };
        let spec = WorkflowSpec {
            name: "release".into(),
            steps: vec![step("build", &[]), step("test", &["build"])],
            fail_fast: false,
        };
        WorkflowRecord::new(JobId::generate(), spec, Timestamp::from_millis(0))
    }

    #[test]
    fn a_name_is_refused_when_blank_too_long_or_holding_a_control_character() {
        for name in ["", "   ", "a\nb", &"n".repeat(MAX_NAME_CHARS + 1)] {
            let Err(ApiError::Invalid(problem)) = check_name(name) else {
                panic!("{name:?} is refused with a 422");
            };
            assert_eq!(problem.0.field.as_deref(), Some("name"));
        }
        check_name(&"é".repeat(MAX_NAME_CHARS)).expect("characters are counted, not bytes");
        check_name("nightly release").expect("a plain name");
    }

    #[test]
    fn a_problem_about_a_job_names_the_steps_job_field() {
        let ApiError::Invalid(problem) =
            in_step(3)(ApiError::invalid("no", Some("argv[0]".to_owned())))
        else {
            panic!("still a 422");
        };
        assert_eq!(problem.0.field.as_deref(), Some("steps[3].job.argv[0]"));
        let ApiError::NotFound(problem) = in_step(3)(ApiError::not_found("none")) else {
            panic!("still a 404");
        };
        assert_eq!(problem.0.field, None);
    }

    #[test]
    fn a_step_whose_job_could_not_take_what_its_dependencies_hand_on_is_refused() {
        checked_steps(&record(&[])).expect("a plain workflow is valid");
        let full: Vec<(String, String)> = (0..capstan_protocol::spec::limits::MAX_ENV)
            .map(|n| (format!("V{n}"), "v".to_owned()))
            .collect();
        let full: Vec<(&str, &str)> = full.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let ApiError::Invalid(problem) =
            checked_steps(&record(&full)).expect_err("too many variables for the second step")
        else {
            panic!("a 422");
        };
        assert_eq!(problem.0.field.as_deref(), Some("steps[1].job.env"));
    }

    #[test]
    fn what_is_audited_names_the_steps_and_never_their_commands() {
        let mut record = record(&[("TOKEN", "hunter2")]);
        record.spec.fail_fast = true;
        let said = describe(&record);
        assert_eq!(said, "`release`, 2 steps (build, test), fail fast, running");
        assert!(!said.contains("hunter2") && !said.contains("/bin/true"));
    }
}
