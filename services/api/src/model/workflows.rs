//! The workflows resource: what a person sends to create a workflow (documented here as
//! poem-openapi objects, read by the protocol's decoder into the `*Wire` types so that an error
//! names its field, `steps[1].job.argv` included), and what anyone allowed to read jobs sees:
//! the graph, where each step stands and the job it ran.
//!
//! The view leaves out what a step's job carries (its environment, its input, its arguments)
//! and the output a step hands on to the steps after it: the jobs themselves are read at
//! `GET /api/v1/jobs/{id}`, with their own rules. What a workflow means (when a step starts,
//! how it ends) is the protocol's (`capstan_protocol::workflow`); this module only converts.

use capstan_protocol::Timestamp;
use capstan_protocol::spec::JobSpecWire;
use capstan_protocol::workflow as protocol;
use poem_openapi::{Enum, Object};
use serde::Deserialize;

use super::JobSubmission;

/// When a step starts, given how the steps it depends on ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
pub enum StepWhen {
    /// Once every dependency succeeded.
    OnSuccess,
    /// Once every dependency ended and one did not succeed: a step that reports or cleans up
    /// after a failure.
    OnFailure,
    /// Once every dependency ended, however: a clean-up step, which runs even when the
    /// workflow is cancelled.
    Always,
}

impl From<protocol::When> for StepWhen {
    fn from(when: protocol::When) -> Self {
        match when {
            protocol::When::OnSuccess => Self::OnSuccess,
            protocol::When::OnFailure => Self::OnFailure,
            protocol::When::Always => Self::Always,
        }
    }
}

/// Where a step stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
pub enum StepStatus {
    /// The steps it depends on have not all ended.
    Waiting,
    /// Its job was submitted and has not ended.
    Running,
    /// Its job succeeded.
    Succeeded,
    /// Its job failed, timed out, was lost or quarantined, or was never accepted.
    Failed,
    /// Its job was cancelled.
    Cancelled,
    /// It never ran: its dependencies did not end as its `when` asks, or `fail_fast` or a
    /// cancel stopped it first.
    Skipped,
}

impl From<protocol::StepStatus> for StepStatus {
    fn from(status: protocol::StepStatus) -> Self {
        match status {
            protocol::StepStatus::Waiting => Self::Waiting,
            protocol::StepStatus::Running => Self::Running,
            protocol::StepStatus::Succeeded => Self::Succeeded,
            protocol::StepStatus::Failed => Self::Failed,
            protocol::StepStatus::Cancelled => Self::Cancelled,
            protocol::StepStatus::Skipped => Self::Skipped,
        }
    }
}

/// Where a workflow stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
pub enum WorkflowStatus {
    /// Steps wait or run.
    Running,
    /// Every step ended, none failed.
    Succeeded,
    /// A step failed, or its job was cancelled.
    Failed,
    /// It was cancelled.
    Cancelled,
}

impl From<protocol::WorkflowStatus> for WorkflowStatus {
    fn from(status: protocol::WorkflowStatus) -> Self {
        match status {
            protocol::WorkflowStatus::Running => Self::Running,
            protocol::WorkflowStatus::Succeeded => Self::Succeeded,
            protocol::WorkflowStatus::Failed => Self::Failed,
            protocol::WorkflowStatus::Cancelled => Self::Cancelled,
        }
    }
}

impl WorkflowStatus {
    /// The protocol's status this one names.
    pub fn to_protocol(self) -> protocol::WorkflowStatus {
        match self {
            Self::Running => protocol::WorkflowStatus::Running,
            Self::Succeeded => protocol::WorkflowStatus::Succeeded,
            Self::Failed => protocol::WorkflowStatus::Failed,
            Self::Cancelled => protocol::WorkflowStatus::Cancelled,
        }
    }
}

/// One step of a workflow to create.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none, deny_unknown_fields)]
pub struct WorkflowStepInput {
    /// Its name, unique in the workflow: 1 to 64 of A-Z, a-z, 0-9, `_`, `-`. The steps after
    /// it read how it ended from `CAPSTAN_STEP_<NAME>_STATUS`, `_EXIT_CODE` and `_OUTPUT` (the
    /// end of its standard output), the name upper-cased with `-` as `_`.
    #[oai(validator(pattern = "^[A-Za-z0-9_-]{1,64}$"))]
    pub name: String,
    /// The job it runs, as `POST /api/v1/jobs` takes it, without `run_at`, `delay`,
    /// `idempotency_key` or `secrets` (stored secrets, `secret_refs`, are for the workflow's
    /// creator), and not a fan-out (`systems`, `nodes`).
    pub job: JobSubmission,
    /// The names of the steps it waits for (none: it starts with the workflow).
    pub depends_on: Option<Vec<String>>,
    /// How they must have ended for it to run (`on_success`).
    pub when: Option<StepWhen>,
}

/// A workflow to create: steps, each a job, run as the graph of their dependencies allows.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none, deny_unknown_fields)]
pub struct WorkflowInput {
    /// A human name: 1 to 128 characters, not blank, none of them a control character.
    #[oai(validator(min_length = 1, max_length = 128))]
    pub name: String,
    /// Its steps: 1 to 100, with no cycle among their dependencies.
    #[oai(validator(min_items = 1, max_items = 100))]
    pub steps: Vec<WorkflowStepInput>,
    /// Whether a step that ends unsuccessfully cancels the running steps and skips the
    /// waiting `on_success` ones (`false`). `on_failure` and `always` steps still run.
    pub fail_fast: Option<bool>,
}

/// [`WorkflowStepInput`] as the protocol's decoder reads it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowStepInputWire {
    /// See [`WorkflowStepInput::name`].
    pub name: String,
    /// See [`WorkflowStepInput::job`].
    pub job: JobSpecWire,
    /// See [`WorkflowStepInput::depends_on`].
    #[serde(default)]
    pub depends_on: Option<Vec<String>>,
    /// See [`WorkflowStepInput::when`].
    #[serde(default)]
    pub when: Option<protocol::When>,
}

/// [`WorkflowInput`] as the protocol's decoder reads it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowInputWire {
    /// See [`WorkflowInput::name`].
    pub name: String,
    /// See [`WorkflowInput::steps`].
    pub steps: Vec<WorkflowStepInputWire>,
    /// See [`WorkflowInput::fail_fast`].
    #[serde(default)]
    pub fail_fast: Option<bool>,
}

/// One step of a workflow, as it stands.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct WorkflowStep {
    /// Its name.
    pub name: String,
    /// The steps it waits for.
    pub depends_on: Vec<String>,
    /// How they must have ended for it to run.
    pub when: StepWhen,
    /// Where it stands.
    pub status: StepStatus,
    /// Its job's id (`GET /api/v1/jobs/{id}`), once submitted.
    pub job: Option<String>,
    /// Its job's exit code, once it ended.
    pub exit_code: Option<i32>,
    /// When its job was submitted.
    pub started_at: Option<String>,
    /// When it ended, or was skipped.
    pub ended_at: Option<String>,
    /// Why it failed when its job does not say (it was never accepted).
    pub error: Option<String>,
}

/// A workflow: its graph, and where it and each of its steps stand.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct Workflow {
    /// Its id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Where it stands.
    pub status: WorkflowStatus,
    /// Whether a step that ends unsuccessfully stops the others.
    pub fail_fast: bool,
    /// Who created it; its steps' jobs are submitted as them.
    pub owner: Option<String>,
    /// When it was created.
    pub created_at: String,
    /// When it last changed.
    pub updated_at: String,
    /// When it ended.
    pub finished_at: Option<String>,
    /// When a cancel was asked.
    pub cancel_requested_at: Option<String>,
    /// Its steps, in the order they were given.
    pub steps: Vec<WorkflowStep>,
}

impl Workflow {
    /// The view of `record`.
    pub fn of(record: protocol::WorkflowRecord) -> Self {
        let steps = record
            .spec
            .steps
            .into_iter()
            .zip(record.steps)
            .map(|(spec, state)| WorkflowStep {
                name: spec.name,
                depends_on: spec.depends_on,
                when: spec.when.into(),
                status: state.status.into(),
                job: state.job.map(|id| id.to_string()),
                exit_code: state.exit_code,
                started_at: state.started_at.map(Timestamp::to_rfc3339),
                ended_at: state.ended_at.map(Timestamp::to_rfc3339),
                error: state.error,
            })
            .collect();
        Workflow {
            id: record.id.to_string(),
            name: record.spec.name,
            status: record.status.into(),
            fail_fast: record.spec.fail_fast,
            owner: record.submitted_by.map(|by| by.principal),
            created_at: record.created_at.to_rfc3339(),
            updated_at: record.updated_at.to_rfc3339(),
            finished_at: record.finished_at.map(Timestamp::to_rfc3339),
            cancel_requested_at: record.cancel_requested_at.map(Timestamp::to_rfc3339),
            steps,
        }
    }
}

/// A workflow's steps, counted by where they stand.
#[derive(Debug, Clone, Default, PartialEq, Eq, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct WorkflowStepCounts {
    /// Every step.
    pub total: u32,
    /// Waiting for their dependencies.
    pub waiting: u32,
    /// Running.
    pub running: u32,
    /// Succeeded.
    pub succeeded: u32,
    /// Failed.
    pub failed: u32,
    /// Cancelled.
    pub cancelled: u32,
    /// Skipped.
    pub skipped: u32,
}

/// A workflow in a list: where it stands, its steps counted.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct WorkflowSummary {
    /// Its id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Where it stands.
    pub status: WorkflowStatus,
    /// Who created it.
    pub owner: Option<String>,
    /// When it was created.
    pub created_at: String,
    /// When it ended.
    pub finished_at: Option<String>,
    /// Its steps by where they stand.
    pub steps: WorkflowStepCounts,
}

impl WorkflowSummary {
    /// The summary of `record`.
    pub fn of(record: &protocol::WorkflowRecord) -> Self {
        let mut counts = WorkflowStepCounts::default();
        for (status, count) in record.tally() {
            let count = u32::try_from(count).unwrap_or(u32::MAX);
            counts.total = counts.total.saturating_add(count);
            let slot = match status {
                protocol::StepStatus::Waiting => &mut counts.waiting,
                protocol::StepStatus::Running => &mut counts.running,
                protocol::StepStatus::Succeeded => &mut counts.succeeded,
                protocol::StepStatus::Failed => &mut counts.failed,
                protocol::StepStatus::Cancelled => &mut counts.cancelled,
                protocol::StepStatus::Skipped => &mut counts.skipped,
            };
            *slot = count;
        }
        WorkflowSummary {
            id: record.id.to_string(),
            name: record.spec.name.clone(),
            status: record.status.into(),
            owner: record.submitted_by.as_ref().map(|by| by.principal.clone()),
            created_at: record.created_at.to_rfc3339(),
            finished_at: record.finished_at.map(Timestamp::to_rfc3339),
            steps: counts,
        }
    }
}

/// The workflows.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct WorkflowList {
    /// Newest first.
    pub items: Vec<WorkflowSummary>,
}

#[cfg(test)]
mod tests {
    use capstan_protocol::{JobId, JobSpec};
    use poem_openapi::types::ToJSON;
    use serde_json::json;

    use super::*;

    #[test]
    fn statuses_and_conditions_keep_the_protocols_spelling() {
        use protocol::StepStatus as Step;
        for status in [
            Step::Waiting,
            Step::Running,
            Step::Succeeded,
            Step::Failed,
            Step::Cancelled,
            Step::Skipped,
        ] {
            assert_eq!(
                StepStatus::from(status).to_json(),
                Some(json!(status.as_str()))
            );
        }
        use protocol::WorkflowStatus as Whole;
        for status in [
            Whole::Running,
            Whole::Succeeded,
            Whole::Failed,
            Whole::Cancelled,
        ] {
            let named = WorkflowStatus::from(status);
            assert_eq!(named.to_json(), Some(json!(status.as_str())));
            assert_eq!(named.to_protocol(), status);
        }
        for when in [
            protocol::When::OnSuccess,
            protocol::When::OnFailure,
            protocol::When::Always,
        ] {
            assert_eq!(
                StepWhen::from(when).to_json(),
                serde_json::to_value(when).ok()
            );
        }
    }

    #[test]
    fn a_summary_counts_every_step_by_where_it_stands() {
        let step = |name: &str, depends_on: &[&str]| protocol::StepSpec {
            name: name.to_owned(),
            job: JobSpec::shell("true"),
            depends_on: depends_on.iter().map(|d| (*d).to_owned()).collect(),
            when: protocol::When::OnSuccess,
        };
        let spec = protocol::WorkflowSpec {
            name: "release".into(),
            steps: vec![step("a", &[]), step("b", &[]), step("c", &["a", "b"])],
            fail_fast: false,
        };
        let mut record =
            protocol::WorkflowRecord::new(JobId::generate(), spec, Timestamp::from_millis(0));
        record.advance(Timestamp::from_millis(1), JobId::generate);
        let summary = WorkflowSummary::of(&record);
        assert_eq!(
            summary.steps,
            WorkflowStepCounts {
                total: 3,
                waiting: 1,
                running: 2,
                ..WorkflowStepCounts::default()
            }
        );
        let view = Workflow::of(record);
        assert_eq!(view.steps[2].depends_on, ["a", "b"]);
        assert!(view.steps[0].job.is_some() && view.steps[2].job.is_none());
    }
}
