//! Workflows: a directed acyclic graph of jobs, each step starting once the steps it depends on
//! have ended as its `when` asks.
//!
//! This module is the workflow's definition and its whole decision, as pure functions: what a
//! definition must satisfy ([`WorkflowSpec::validate`]: unique step names, known dependencies,
//! no cycle, each named by the path that is wrong), what the workflow does next given what its
//! steps became ([`WorkflowRecord::advance`]), and what a step's job carries from the steps
//! before it ([`WorkflowRecord::step_job`]: their exit codes and the end of their output, as
//! environment variables).
//!
//! The rules:
//! - `when: on_success` (the default) starts a step once every dependency succeeded;
//!   `on_failure` once every dependency ended and one did not succeed (failed, timed out, lost,
//!   cancelled or skipped); `always` once every dependency ended. A step whose dependencies
//!   ended otherwise is skipped.
//! - Steps with no path between them run at once.
//! - `fail_fast`: when a step ends unsuccessfully, the running steps are cancelled and the
//!   waiting `on_success` steps skipped; `on_failure` and `always` steps still run, so that
//!   clean-up happens. Cancelling the workflow cancels the running steps and skips every
//!   waiting step but the `always` ones.
//! - The workflow ends when every step has: `cancelled` if it was cancelled, `failed` if a
//!   step failed or its job was cancelled (a clean-up step that ran does not undo that),
//!   `succeeded` otherwise.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::auth::SubmittedBy;
use crate::ids::JobId;
use crate::job::JobStatus;
use crate::spec::{JobSpec, SpecError};
use crate::timestamp::Timestamp;

/// The most steps one workflow may have.
pub const MAX_STEPS: usize = 100;
/// The most steps one step may depend on (each passes on three variables, one of up to
/// [`OUTPUT_TAIL_BYTES`]).
pub const MAX_DEPENDENCIES: usize = 32;
/// The longest step name.
pub const MAX_STEP_NAME: usize = 64;
/// How much of the end of a step's standard output its dependants receive.
pub const OUTPUT_TAIL_BYTES: usize = 4096;
/// A step's job's metadata entry naming its workflow.
pub const WORKFLOW_KEY: &str = "capstan.io/workflow";
/// A step's job's metadata entry naming its step.
pub const STEP_KEY: &str = "capstan.io/step";

/// When a step starts, given how the steps it depends on ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum When {
    /// Every dependency succeeded.
    #[default]
    OnSuccess,
    /// Every dependency ended, and one did not succeed.
    OnFailure,
    /// Every dependency ended, however.
    Always,
}

/// One step as defined.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct StepSpec {
    /// Its name, unique in the workflow: letters, digits, `_` and `-`.
    pub name: String,
    /// What it runs.
    pub job: JobSpec,
    /// The steps it waits for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// How they must have ended.
    #[serde(default)]
    pub when: When,
}

/// A workflow as defined (`POST /api/v1/workflows`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct WorkflowSpec {
    /// A human name.
    pub name: String,
    /// Its steps.
    pub steps: Vec<StepSpec>,
    /// Whether a step that fails cancels the running ones and skips the waiting `on_success`
    /// ones.
    #[serde(default)]
    pub fail_fast: bool,
}

impl WorkflowSpec {
    /// Each step's place in `steps`, by name.
    pub fn step_indices(&self) -> HashMap<&str, usize> {
        self.steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect()
    }

    /// Checks the graph, naming the path that is wrong: at least one step and at most
    /// [`MAX_STEPS`], unique valid names, known dependencies, no step depending on itself, no
    /// cycle, and jobs that start when their step does.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.steps.is_empty() || self.steps.len() > MAX_STEPS {
            return Err(SpecError::new(
                "steps",
                format!("1 to {MAX_STEPS} steps, got {}", self.steps.len()),
            ));
        }
        let mut index: HashMap<&str, usize> = HashMap::new();
        for (i, step) in self.steps.iter().enumerate() {
            let valid = !step.name.is_empty()
                && step.name.len() <= MAX_STEP_NAME
                && step
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !valid {
                return Err(SpecError::new(
                    format!("steps[{i}].name"),
                    format!("1 to {MAX_STEP_NAME} letters, digits, `_` or `-`"),
                ));
            }
            if let Some(first) = index.insert(step.name.as_str(), i) {
                return Err(SpecError::new(
                    format!("steps[{i}].name"),
                    format!("`{}` is also the name of steps[{first}]", step.name),
                ));
            }
            if step.job.start.is_some() {
                return Err(SpecError::new(
                    format!("steps[{i}].job.run_at"),
                    "a step starts when its dependencies allow: give no `run_at` or `delay`",
                ));
            }
            if step.job.idempotency_key.is_some() {
                return Err(SpecError::new(
                    format!("steps[{i}].job.idempotency_key"),
                    "a step's job carries its own",
                ));
            }
        }
        for (i, step) in self.steps.iter().enumerate() {
            let passed = 3 * step.depends_on.len();
            if step.depends_on.len() > MAX_DEPENDENCIES
                || step.job.env.len() + passed > crate::spec::limits::MAX_ENV
            {
                return Err(SpecError::new(
                    format!("steps[{i}].depends_on"),
                    format!(
                        "at most {MAX_DEPENDENCIES} dependencies, and {} variables with the \
                         three each passes on",
                        crate::spec::limits::MAX_ENV
                    ),
                ));
            }
            for (j, dependency) in step.depends_on.iter().enumerate() {
                if dependency == &step.name {
                    return Err(SpecError::new(
                        format!("steps[{i}].depends_on[{j}]"),
                        format!("`{dependency}` is the step itself"),
                    ));
                }
                if !index.contains_key(dependency.as_str()) {
                    return Err(SpecError::new(
                        format!("steps[{i}].depends_on[{j}]"),
                        format!("no step is named `{dependency}`"),
                    ));
                }
            }
        }
        if let Some(cycle) = self.cycle(&index) {
            let path: Vec<&str> = cycle.iter().map(|i| self.steps[*i].name.as_str()).collect();
            return Err(SpecError::new(
                format!("steps[{}].depends_on", cycle[0]),
                format!("a cycle: {}", path.join(" → ")),
            ));
        }
        Ok(())
    }

    /// A cycle, as step indices from a step back to itself, if the graph has one.
    fn cycle(&self, index: &HashMap<&str, usize>) -> Option<Vec<usize>> {
        // Depth-first, colouring steps: 0 unvisited, 1 on the current path, 2 done.
        fn visit(
            spec: &WorkflowSpec,
            index: &HashMap<&str, usize>,
            step: usize,
            colour: &mut [u8],
            path: &mut Vec<usize>,
        ) -> Option<Vec<usize>> {
            colour[step] = 1;
            path.push(step);
            for dependency in &spec.steps[step].depends_on {
                let next = index[dependency.as_str()];
                match colour[next] {
                    1 => {
                        let start = path.iter().position(|s| *s == next).unwrap_or(0);
                        let mut cycle = path[start..].to_vec();
                        cycle.push(next);
                        return Some(cycle);
                    }
                    0 => {
                        if let Some(cycle) = visit(spec, index, next, colour, path) {
                            return Some(cycle);
                        }
                    }
                    _ => {}
                }
            }
            path.pop();
            colour[step] = 2;
            None
        }
        let mut colour = vec![0u8; self.steps.len()];
        for step in 0..self.steps.len() {
            if colour[step] == 0 {
                let mut path = Vec::new();
                if let Some(cycle) = visit(self, index, step, &mut colour, &mut path) {
                    return Some(cycle);
                }
            }
        }
        None
    }
}

/// Where a step stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Its dependencies have not all ended yet.
    Waiting,
    /// Its job was submitted and has not ended.
    Running,
    /// Its job succeeded.
    Succeeded,
    /// Its job failed, timed out, was lost or quarantined.
    Failed,
    /// Its job was cancelled.
    Cancelled,
    /// It never ran: its dependencies did not end as its `when` asks, or `fail_fast` or a
    /// cancel stopped it first.
    Skipped,
}

impl StepStatus {
    /// The name, as on the wire and in subjects.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Skipped => "skipped",
        }
    }

    /// True once the step will not change again.
    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Waiting | Self::Running)
    }

    fn of_job(status: JobStatus) -> Self {
        match status {
            JobStatus::Succeeded => Self::Succeeded,
            JobStatus::Cancelled => Self::Cancelled,
            status if status.is_terminal() => Self::Failed,
            _ => Self::Running,
        }
    }
}

/// One step's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct StepState {
    /// Where it stands.
    pub status: StepStatus,
    /// Its job, once submitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobId>,
    /// Its job's exit code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The end of its standard output (at most [`OUTPUT_TAIL_BYTES`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// When its job was submitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Timestamp>,
    /// When it ended (or was skipped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<Timestamp>,
    /// Why it failed without its job saying so (its job was never accepted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Where a workflow stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum WorkflowStatus {
    /// Steps wait or run.
    Running,
    /// Every step ended, none failed.
    Succeeded,
    /// A step failed.
    Failed,
    /// It was cancelled.
    Cancelled,
}

impl WorkflowStatus {
    /// The name, as on the wire and in subjects.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// True once the workflow will not change again.
    pub fn is_terminal(self) -> bool {
        self != Self::Running
    }
}

/// A workflow as stored: its definition and where each step stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct WorkflowRecord {
    /// Its id.
    pub id: JobId,
    /// Its definition.
    pub spec: WorkflowSpec,
    /// Each step's state, in the definition's order.
    pub steps: Vec<StepState>,
    /// Where it stands.
    pub status: WorkflowStatus,
    /// When a cancel was asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_requested_at: Option<Timestamp>,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
    /// Who created it: its steps' jobs are submitted as them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_by: Option<SubmittedBy>,
    /// The trace it belongs to (W3C `traceparent` of the request that created it): every
    /// step's job joins it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// What [`WorkflowRecord::advance`] asks of its caller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Advance {
    /// Steps (indices) whose jobs to submit now: they are `running` in the record, with the
    /// job id chosen.
    pub start: Vec<usize>,
    /// Jobs to cancel.
    pub cancel: Vec<JobId>,
    /// Whether the record changed.
    pub changed: bool,
}

impl WorkflowRecord {
    /// A new workflow over a checked `spec`, every step waiting.
    pub fn new(id: JobId, spec: WorkflowSpec, now: Timestamp) -> Self {
        let steps = spec
            .steps
            .iter()
            .map(|_| StepState {
                status: StepStatus::Waiting,
                job: None,
                exit_code: None,
                output: None,
                started_at: None,
                ended_at: None,
                error: None,
            })
            .collect();
        Self {
            id,
            spec,
            steps,
            status: WorkflowStatus::Running,
            cancel_requested_at: None,
            created_at: now,
            updated_at: now,
            finished_at: None,
            submitted_by: None,
            traceparent: None,
        }
    }

    /// Records what a step's job became; a job no step names is ignored (a forged link), and a
    /// step that ended stays ended. Returns whether anything changed.
    pub fn observe(
        &mut self,
        job: JobId,
        status: JobStatus,
        exit_code: Option<i32>,
        output: Option<&str>,
        now: Timestamp,
    ) -> bool {
        let Some(step) = self.steps.iter_mut().find(|s| s.job == Some(job)) else {
            return false;
        };
        if step.status.is_terminal() {
            return false;
        }
        let status = StepStatus::of_job(status);
        if status == step.status {
            return false;
        }
        step.status = status;
        step.exit_code = exit_code;
        // An environment variable cannot hold a NUL.
        step.output = output.map(|text| tail(text, OUTPUT_TAIL_BYTES).replace('\0', ""));
        if status.is_terminal() {
            step.ended_at = Some(now);
        }
        true
    }

    /// Fails the running steps whose jobs (`jobs`) were never accepted, saying `why`. Returns
    /// whether anything changed.
    pub fn never_accepted(&mut self, jobs: &[JobId], why: &str, now: Timestamp) -> bool {
        let mut changed = false;
        for step in &mut self.steps {
            if step.status == StepStatus::Running && step.job.is_some_and(|j| jobs.contains(&j)) {
                step.status = StepStatus::Failed;
                step.error = Some(why.to_owned());
                step.ended_at = Some(now);
                changed = true;
            }
        }
        changed
    }

    /// The step that runs `job`, by index.
    pub fn step_of(&self, job: JobId) -> Option<usize> {
        self.steps.iter().position(|s| s.job == Some(job))
    }

    /// Asks for a cancel. Returns whether the record changed (false once asked or ended).
    pub fn request_cancel(&mut self, now: Timestamp) -> bool {
        if self.status != WorkflowStatus::Running || self.cancel_requested_at.is_some() {
            return false;
        }
        self.cancel_requested_at = Some(now);
        self.updated_at = now;
        true
    }

    /// Decides what the workflow does next from what its steps became: starts the steps whose
    /// dependencies ended as they ask (naming each one's job with `new_job`), skips those that
    /// never will, cancels running steps when it stops, and ends it once every step has.
    pub fn advance(&mut self, now: Timestamp, mut new_job: impl FnMut() -> JobId) -> Advance {
        let mut advance = Advance::default();
        if self.status != WorkflowStatus::Running {
            return advance;
        }
        let failed = self
            .steps
            .iter()
            .any(|s| matches!(s.status, StepStatus::Failed));
        let stopping = self.cancel_requested_at.is_some() || (self.spec.fail_fast && failed);
        if stopping {
            advance.cancel = self
                .steps
                .iter()
                .filter(|s| s.status == StepStatus::Running)
                .filter_map(|s| s.job)
                .collect();
        }
        let index = self.spec.step_indices();
        // Skipping a step can decide the steps after it: go round until nothing moves.
        loop {
            let mut moved = false;
            for i in 0..self.steps.len() {
                if self.steps[i].status != StepStatus::Waiting {
                    continue;
                }
                let step = &self.spec.steps[i];
                let cancelled = self.cancel_requested_at.is_some();
                let stopped = match step.when {
                    When::OnSuccess => stopping,
                    When::OnFailure => cancelled,
                    When::Always => false,
                };
                if stopped {
                    self.steps[i].status = StepStatus::Skipped;
                    self.steps[i].ended_at = Some(now);
                    moved = true;
                    continue;
                }
                let ends: Vec<StepStatus> = step
                    .depends_on
                    .iter()
                    .map(|name| self.steps[index[name.as_str()]].status)
                    .collect();
                if !ends.iter().all(|s| s.is_terminal()) {
                    continue;
                }
                let all_succeeded = ends.iter().all(|s| *s == StepStatus::Succeeded);
                let runs = match step.when {
                    When::OnSuccess => all_succeeded,
                    When::OnFailure => !all_succeeded,
                    When::Always => true,
                };
                if runs {
                    self.steps[i].status = StepStatus::Running;
                    self.steps[i].job = Some(new_job());
                    self.steps[i].started_at = Some(now);
                    advance.start.push(i);
                } else {
                    self.steps[i].status = StepStatus::Skipped;
                    self.steps[i].ended_at = Some(now);
                }
                moved = true;
            }
            if !moved {
                break;
            }
            advance.changed = true;
        }
        if self.steps.iter().all(|s| s.status.is_terminal()) {
            self.status = if self.cancel_requested_at.is_some() {
                WorkflowStatus::Cancelled
            } else if self
                .steps
                .iter()
                .any(|s| matches!(s.status, StepStatus::Failed | StepStatus::Cancelled))
            {
                WorkflowStatus::Failed
            } else {
                WorkflowStatus::Succeeded
            };
            self.finished_at = Some(now);
            advance.changed = true;
        }
        if advance.changed {
            self.updated_at = now;
        }
        advance
    }

    /// The job step `index` runs: its own, with the results of the steps it depends on in its
    /// environment (`CAPSTAN_STEP_<NAME>_STATUS`, `_EXIT_CODE`, `_OUTPUT`, the name upper-cased
    /// with `-` as `_`), and its workflow and step in its metadata.
    pub fn step_job(&self, index: usize) -> JobSpec {
        let step = &self.spec.steps[index];
        let mut job = step.job.clone();
        for dependency in &step.depends_on {
            let Some(at) = self.spec.steps.iter().position(|s| &s.name == dependency) else {
                continue;
            };
            let state = &self.steps[at];
            let prefix = format!("CAPSTAN_STEP_{}", env_name(dependency));
            let status = serde_json::to_value(state.status)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            job.env.insert(format!("{prefix}_STATUS"), status);
            if let Some(code) = state.exit_code {
                job.env
                    .insert(format!("{prefix}_EXIT_CODE"), code.to_string());
            }
            if let Some(output) = &state.output {
                job.env.insert(format!("{prefix}_OUTPUT"), output.clone());
            }
        }
        job.metadata
            .insert(WORKFLOW_KEY.into(), self.id.to_string());
        job.metadata.insert(STEP_KEY.into(), step.name.clone());
        job
    }

    /// The steps by status, for a summary.
    pub fn tally(&self) -> BTreeMap<StepStatus, usize> {
        let mut tally = BTreeMap::new();
        for step in &self.steps {
            *tally.entry(step.status).or_insert(0) += 1;
        }
        tally
    }
}

/// A workflow's start or end, or one of its steps' (`capstan.events.workflows.…`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct WorkflowEvent {
    /// The workflow.
    pub workflow: JobId,
    /// Its name.
    pub name: String,
    /// Where it stands.
    pub status: WorkflowStatus,
    /// The step this event is about; none for the workflow's own start and end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<StepEvent>,
    /// When it was written.
    pub at: Timestamp,
}

/// A step's part of a [`WorkflowEvent`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct StepEvent {
    /// Its name.
    pub name: String,
    /// Where it stands.
    pub status: StepStatus,
    /// Its job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobId>,
    /// Its job's exit code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

impl WorkflowEvent {
    /// The deduplication id: one event per workflow or step status.
    pub fn message_id(&self) -> String {
        match &self.step {
            Some(step) => format!(
                "workflow:{}:{}:{}",
                self.workflow,
                step.name,
                step.status.as_str()
            ),
            None => format!("workflow:{}:{}", self.workflow, self.status.as_str()),
        }
    }

    /// The events a change of a workflow from `before` (none: it was just created) to `after`
    /// announces: its start, each step that started or ended, its end.
    pub fn between(before: Option<&WorkflowRecord>, after: &WorkflowRecord) -> Vec<Self> {
        let event = |step: Option<StepEvent>| Self {
            workflow: after.id,
            name: after.spec.name.clone(),
            status: after.status,
            step,
            at: after.updated_at,
        };
        let mut events = Vec::new();
        if before.is_none() {
            events.push(Self {
                status: WorkflowStatus::Running,
                ..event(None)
            });
        }
        for (i, state) in after.steps.iter().enumerate() {
            let was = before.and_then(|b| b.steps.get(i)).map(|s| s.status);
            if state.status == StepStatus::Waiting || was == Some(state.status) {
                continue;
            }
            events.push(event(Some(StepEvent {
                name: after.spec.steps[i].name.clone(),
                status: state.status,
                job: state.job,
                exit_code: state.exit_code,
            })));
        }
        if after.status.is_terminal() && before.is_none_or(|b| !b.status.is_terminal()) {
            events.push(event(None));
        }
        events
    }
}

/// A step name as part of an environment variable's name.
fn env_name(step: &str) -> String {
    step.chars()
        .map(|c| {
            if c == '-' {
                '_'
            } else {
                c.to_ascii_uppercase()
            }
        })
        .collect()
}

/// The last `max` bytes of `text`, cut at a character boundary.
pub fn tail(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timestamp = Timestamp::from_millis(5);

    fn job() -> JobSpec {
        JobSpec::shell("true")
    }

    fn step(name: &str, depends_on: &[&str], when: When) -> StepSpec {
        StepSpec {
            name: name.to_owned(),
            job: job(),
            depends_on: depends_on.iter().map(|s| (*s).to_owned()).collect(),
            when,
        }
    }

    fn workflow(steps: Vec<StepSpec>, fail_fast: bool) -> WorkflowSpec {
        WorkflowSpec {
            name: "release".into(),
            steps,
            fail_fast,
        }
    }

    fn diamond(fail_fast: bool) -> WorkflowSpec {
        workflow(
            vec![
                step("build", &[], When::OnSuccess),
                step("test-a", &["build"], When::OnSuccess),
                step("test-b", &["build"], When::OnSuccess),
                step("deploy", &["test-a", "test-b"], When::OnSuccess),
                step("clean-up", &["deploy"], When::Always),
                step("page", &["test-a", "test-b"], When::OnFailure),
            ],
            fail_fast,
        )
    }

    fn field(spec: &WorkflowSpec) -> (String, String) {
        let error = spec.validate().expect_err("invalid");
        (error.field, error.reason)
    }

    /// A workflow run to its end: `ends` says how each step's job ends (succeeded unless
    /// named). Returns the order steps started in, in rounds, and the record.
    fn run(spec: WorkflowSpec, ends: &[(&str, JobStatus)]) -> (Vec<Vec<String>>, WorkflowRecord) {
        spec.validate().expect("valid");
        let mut record = WorkflowRecord::new(JobId::generate(), spec, Timestamp::from_millis(0));
        let mut rounds = Vec::new();
        for _ in 0..20 {
            let advance = record.advance(Timestamp::from_millis(1), JobId::generate);
            if record.status != WorkflowStatus::Running {
                break;
            }
            let started: Vec<String> = advance
                .start
                .iter()
                .map(|i| record.spec.steps[*i].name.clone())
                .collect();
            for job in advance.cancel {
                record.observe(job, JobStatus::Cancelled, None, None, T);
            }
            let running: Vec<(String, JobId)> = record
                .steps
                .iter()
                .zip(&record.spec.steps)
                .filter(|(state, _)| state.status == StepStatus::Running)
                .map(|(state, spec)| (spec.name.clone(), state.job.expect("a job")))
                .collect();
            for (name, job) in running {
                let status = ends
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map_or(JobStatus::Succeeded, |(_, s)| *s);
                let code = i32::from(status != JobStatus::Succeeded);
                record.observe(
                    job,
                    status,
                    Some(code),
                    Some(&format!("out of {name}\n")),
                    T,
                );
            }
            if !started.is_empty() {
                rounds.push(started);
            }
        }
        (rounds, record)
    }

    #[test]
    fn a_diamond_runs_its_middle_in_parallel_and_its_join_after_both() {
        let (rounds, record) = run(diamond(false), &[]);
        assert_eq!(
            rounds,
            vec![
                vec!["build".to_owned()],
                vec!["test-a".to_owned(), "test-b".to_owned()],
                vec!["deploy".to_owned()],
                vec!["clean-up".to_owned()],
            ]
        );
        assert_eq!(record.status, WorkflowStatus::Succeeded);
        let page = record
            .spec
            .steps
            .iter()
            .position(|s| s.name == "page")
            .expect("page");
        assert_eq!(record.steps[page].status, StepStatus::Skipped);
    }

    #[test]
    fn a_failing_step_skips_what_needs_its_success_and_runs_the_clean_up_steps() {
        let (rounds, record) = run(diamond(false), &[("test-a", JobStatus::Failed)]);
        let started: Vec<String> = rounds.concat();
        assert!(started.contains(&"test-b".to_owned()));
        assert!(started.contains(&"page".to_owned()), "{started:?}");
        assert!(started.contains(&"clean-up".to_owned()), "{started:?}");
        assert!(!started.contains(&"deploy".to_owned()));
        assert_eq!(record.status, WorkflowStatus::Failed);
    }

    #[test]
    fn with_fail_fast_a_failure_cancels_the_running_steps_and_skips_the_waiting_ones() {
        let spec = workflow(
            vec![
                step("quick-fail", &[], When::OnSuccess),
                step("slow", &[], When::OnSuccess),
                step("after-slow", &["slow"], When::OnSuccess),
                step("report", &["quick-fail", "slow"], When::Always),
            ],
            true,
        );
        let mut record = WorkflowRecord::new(JobId::generate(), spec, Timestamp::from_millis(0));
        let first = record.advance(Timestamp::from_millis(1), JobId::generate);
        assert_eq!(first.start, vec![0, 1]);
        let fail = record.steps[0].job.expect("a job");
        let slow = record.steps[1].job.expect("a job");
        record.observe(fail, JobStatus::Failed, Some(1), None, T);
        let next = record.advance(Timestamp::from_millis(2), JobId::generate);
        assert_eq!(next.cancel, vec![slow]);
        assert_eq!(record.steps[2].status, StepStatus::Skipped);
        assert_eq!(record.steps[2].ended_at, Some(Timestamp::from_millis(2)));
        record.observe(slow, JobStatus::Cancelled, None, None, T);
        let last = record.advance(Timestamp::from_millis(3), JobId::generate);
        assert_eq!(last.start, vec![3], "the `always` step still runs");
        let report = record.steps[3].job.expect("a job");
        record.observe(report, JobStatus::Succeeded, Some(0), None, T);
        record.advance(Timestamp::from_millis(4), JobId::generate);
        assert_eq!(record.status, WorkflowStatus::Failed);
    }

    #[test]
    fn without_fail_fast_the_other_branches_go_on_after_a_failure() {
        let spec = workflow(
            vec![
                step("a", &[], When::OnSuccess),
                step("b", &[], When::OnSuccess),
                step("after-b", &["b"], When::OnSuccess),
            ],
            false,
        );
        let (rounds, record) = run(spec, &[("a", JobStatus::Failed)]);
        assert!(rounds.concat().contains(&"after-b".to_owned()));
        assert_eq!(record.status, WorkflowStatus::Failed);
    }

    #[test]
    fn a_cancelled_workflow_cancels_its_running_steps_and_ends_cancelled() {
        let mut record =
            WorkflowRecord::new(JobId::generate(), diamond(false), Timestamp::from_millis(0));
        record.advance(Timestamp::from_millis(1), JobId::generate);
        let build = record.steps[0].job.expect("a job");
        assert!(record.request_cancel(Timestamp::from_millis(2)));
        assert!(!record.request_cancel(Timestamp::from_millis(3)));
        let mut advance = record.advance(Timestamp::from_millis(3), JobId::generate);
        assert_eq!(advance.cancel, vec![build]);
        record.observe(build, JobStatus::Cancelled, None, None, T);
        let mut started = Vec::new();
        for _ in 0..5 {
            // `clean-up` depends only on `deploy`, skipped at once: it may start while
            // `build` is still stopping.
            for i in std::mem::take(&mut advance.start) {
                started.push(record.spec.steps[i].name.clone());
                let job = record.steps[i].job.expect("a job");
                record.observe(job, JobStatus::Succeeded, Some(0), None, T);
            }
            advance = record.advance(Timestamp::from_millis(4), JobId::generate);
        }
        assert_eq!(
            started,
            vec!["clean-up".to_owned()],
            "only the `always` step runs"
        );
        assert_eq!(record.status, WorkflowStatus::Cancelled);
    }

    #[test]
    fn a_step_receives_the_exit_codes_and_output_ends_of_its_dependencies() {
        let mut record =
            WorkflowRecord::new(JobId::generate(), diamond(false), Timestamp::from_millis(0));
        record.advance(Timestamp::from_millis(1), JobId::generate);
        let build = record.steps[0].job.expect("a job");
        let long = "x".repeat(OUTPUT_TAIL_BYTES) + "version=1.2.3\n";
        record.observe(build, JobStatus::Succeeded, Some(0), Some(&long), T);
        record.advance(Timestamp::from_millis(2), JobId::generate);
        let job = record.step_job(1);
        assert_eq!(job.env["CAPSTAN_STEP_BUILD_STATUS"], "succeeded");
        assert_eq!(job.env["CAPSTAN_STEP_BUILD_EXIT_CODE"], "0");
        let output = &job.env["CAPSTAN_STEP_BUILD_OUTPUT"];
        assert_eq!(output.len(), OUTPUT_TAIL_BYTES);
        assert!(output.ends_with("version=1.2.3\n"));
        assert_eq!(job.metadata[STEP_KEY], "test-a");
        assert_eq!(job.metadata[WORKFLOW_KEY], record.id.to_string());
        assert_eq!(env_name("test-a"), "TEST_A");
    }

    #[test]
    fn a_cycle_an_unknown_dependency_and_a_duplicate_name_are_refused_with_the_wrong_path() {
        let cyclic = workflow(
            vec![
                step("a", &["c"], When::OnSuccess),
                step("b", &["a"], When::OnSuccess),
                step("c", &["b"], When::OnSuccess),
            ],
            false,
        );
        let (path, reason) = field(&cyclic);
        assert_eq!(path, "steps[0].depends_on");
        assert_eq!(reason, "a cycle: a → c → b → a");
        let unknown = workflow(
            vec![
                step("a", &[], When::OnSuccess),
                step("b", &["a", "z"], When::OnSuccess),
            ],
            false,
        );
        assert_eq!(field(&unknown).0, "steps[1].depends_on[1]");
        let twice = workflow(
            vec![
                step("a", &[], When::OnSuccess),
                step("a", &[], When::OnSuccess),
            ],
            false,
        );
        assert_eq!(
            field(&twice),
            (
                "steps[1].name".to_owned(),
                "`a` is also the name of steps[0]".to_owned()
            )
        );
        let own = workflow(vec![step("a", &["a"], When::OnSuccess)], false);
        assert_eq!(field(&own).0, "steps[0].depends_on[0]");
        assert_eq!(field(&workflow(vec![], false)).0, "steps");
        let mut delayed = step("a", &[], When::OnSuccess);
        delayed.job.start = Some(crate::spec::Start::After(std::time::Duration::from_secs(1)));
        assert_eq!(
            field(&workflow(vec![delayed], false)).0,
            "steps[0].job.run_at"
        );
        assert!(diamond(true).validate().is_ok());
    }

    #[test]
    fn an_event_of_a_job_no_step_names_changes_nothing() {
        let mut record =
            WorkflowRecord::new(JobId::generate(), diamond(false), Timestamp::from_millis(0));
        record.advance(Timestamp::from_millis(1), JobId::generate);
        assert!(!record.observe(JobId::generate(), JobStatus::Failed, Some(1), None, T));
        let build = record.steps[0].job.expect("a job");
        assert!(record.observe(build, JobStatus::Succeeded, Some(0), None, T));
        assert!(
            !record.observe(build, JobStatus::Failed, Some(1), None, T),
            "an end stays"
        );
    }

    #[test]
    fn a_workflow_announces_its_start_each_step_that_moved_and_its_end() {
        let spec = workflow(
            vec![
                step("a", &[], When::OnSuccess),
                step("b", &["a"], When::OnSuccess),
            ],
            false,
        );
        let mut record = WorkflowRecord::new(JobId::generate(), spec, Timestamp::from_millis(0));
        record.advance(Timestamp::from_millis(1), JobId::generate);
        let created = WorkflowEvent::between(None, &record);
        let names: Vec<String> = created.iter().map(WorkflowEvent::message_id).collect();
        let id = record.id;
        assert_eq!(
            names,
            vec![
                format!("workflow:{id}:running"),
                format!("workflow:{id}:a:running")
            ]
        );
        let before = record.clone();
        let a = record.steps[0].job.expect("a job");
        record.observe(a, JobStatus::Failed, Some(3), None, T);
        record.advance(Timestamp::from_millis(2), JobId::generate);
        let moved = WorkflowEvent::between(Some(&before), &record);
        let names: Vec<String> = moved.iter().map(WorkflowEvent::message_id).collect();
        assert_eq!(
            names,
            vec![
                format!("workflow:{id}:a:failed"),
                format!("workflow:{id}:b:skipped"),
                format!("workflow:{id}:failed"),
            ]
        );
        assert_eq!(moved[0].step.as_ref().and_then(|s| s.exit_code), Some(3));
        assert!(WorkflowEvent::between(Some(&record), &record).is_empty());
    }

    #[test]
    fn a_step_whose_job_was_cancelled_or_never_accepted_fails_the_workflow() {
        let spec = workflow(
            vec![
                step("a", &[], When::OnSuccess),
                step("b", &[], When::OnSuccess),
            ],
            false,
        );
        let mut record = WorkflowRecord::new(JobId::generate(), spec, Timestamp::from_millis(0));
        record.advance(Timestamp::from_millis(1), JobId::generate);
        let (a, b) = (
            record.steps[0].job.expect("a job"),
            record.steps[1].job.expect("a job"),
        );
        record.observe(a, JobStatus::Cancelled, None, None, T);
        assert!(record.never_accepted(&[b], "refused", T));
        assert_eq!(record.steps[1].error.as_deref(), Some("refused"));
        record.advance(Timestamp::from_millis(2), JobId::generate);
        assert_eq!(record.status, WorkflowStatus::Failed);
        assert_eq!(record.step_of(b), Some(1));
    }

    #[test]
    fn a_step_output_loses_its_nul_bytes_and_too_many_dependencies_are_refused() {
        let mut record =
            WorkflowRecord::new(JobId::generate(), diamond(false), Timestamp::from_millis(0));
        record.advance(Timestamp::from_millis(1), JobId::generate);
        let build = record.steps[0].job.expect("a job");
        record.observe(build, JobStatus::Succeeded, Some(0), Some("a\0b"), T);
        assert_eq!(record.steps[0].output.as_deref(), Some("ab"));
        let mut steps: Vec<StepSpec> = (0..=MAX_DEPENDENCIES)
            .map(|i| step(&format!("s{i}"), &[], When::OnSuccess))
            .collect();
        let names: Vec<String> = steps.iter().map(|s| s.name.clone()).collect();
        let mut join = step("join", &[], When::OnSuccess);
        join.depends_on = names;
        steps.push(join);
        let (path, _) = field(&workflow(steps, false));
        assert_eq!(path, format!("steps[{}].depends_on", MAX_DEPENDENCIES + 1));
    }
}
