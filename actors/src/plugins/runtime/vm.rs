//! One plugin config's JavaScript VM on boa: loads the transpiled plugin, builds its `meta`,
//! and calls its methods under the task deadline.
//!
//! A `PluginVm` is `!Send` (boa's `Context` is), so it lives on one worker thread of the pool
//! for its whole life. The host functions are plain `fn`s: what they need for the call in
//! progress (the host services, the deadline, what the call produced) sits in a thread-local
//! `ActiveCall` that exists only while a call runs.

use std::cell::RefCell;
use std::future::Future;
use std::pin::pin;
use std::rc::Rc;
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::{Duration, Instant};

use boa_engine::builtins::promise::PromiseState;
use boa_engine::object::builtins::{JsArray, JsPromise, JsUint8Array};
use boa_engine::property::PropertyKey;
use boa_engine::{
    Context, JsError, JsObject, JsResult, JsString, JsValue, Source, js_string, script::Script,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::natives::{self, PluginHost};
use super::plain::{self, Originals, Plain};
use super::prelude::{ExportSources, Prelude};
use super::{Attachment, CallEffects, VmIdentity, VmSource};
use crate::event::envelope::parse_like_javascript;

/// How many boa "clock cycles" run between two deadline checks. At about 10 ns per cycle
/// this checks every few hundred microseconds, which costs nothing measurable.
const DEADLINE_CHECK_BUDGET: u32 = 20_000;

/// Limits every call of a VM runs under.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmLimits {
    /// TASK_TIMEOUT: a call (including the promises it awaits) is abandoned after this.
    pub task_timeout: Duration,
    /// Loop iterations one call frame may run; stops tight loops inside host callbacks
    /// (`Array.prototype.map` and friends) that the deadline check cannot interrupt.
    pub loop_iteration_limit: u64,
    /// Nested JavaScript calls.
    pub recursion_limit: usize,
    /// Values on the VM stack.
    pub stack_size_limit: usize,
    /// Net bytes one call may allocate; past it the worker thread is stopped and replaced
    /// (see `plugin-server-alloc`), since a failed allocation would abort the process.
    pub memory_limit_bytes: u64,
}

impl Default for VmLimits {
    fn default() -> Self {
        Self {
            task_timeout: Duration::from_secs(30),
            loop_iteration_limit: 10_000_000,
            recursion_limit: 400,
            stack_size_limit: 1024 * 64,
            memory_limit_bytes: 512 * 1024 * 1024,
        }
    }
}

/// Why a call did not produce a value.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq, Serialize, Deserialize)]
pub enum CallError {
    /// The plugin threw (or rejected); `name` is the error's name (`TypeError`, `RetryError`,
    /// or `Error` for thrown non-errors).
    #[error("{name}: {message}")]
    Thrown { name: String, message: String },
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("the returned promise never settled")]
    NeverSettled,
    /// A boa runtime limit (loop iterations, recursion, stack) stopped the call.
    #[error("runtime limit: {0}")]
    Limit(String),
}

impl CallError {
    /// An argument given as JSON text that does not parse (the server made it, so this is a
    /// bug of ours, reported as the plugin's failed call rather than lost).
    pub fn unreadable(error: &serde_json::Error) -> Self {
        Self::Thrown {
            name: "SyntaxError".into(),
            message: format!("the event is not JSON: {error}"),
        }
    }

    pub fn is_retry(&self) -> bool {
        matches!(self, Self::Thrown { name, .. } if name == "RetryError")
    }

    /// Whether the VM may be in a half-run state and must be rebuilt before its next call.
    pub fn poisons_vm(&self) -> bool {
        matches!(self, Self::Timeout(_))
    }

    /// The short type PostHog records in app metrics and `$plugins_failed` logs.
    pub fn error_type(&self) -> &str {
        match self {
            Self::Thrown { name, .. } => name,
            Self::Timeout(_) | Self::NeverSettled => "TimeoutError",
            Self::Limit(_) => "RuntimeLimitError",
        }
    }
}

/// A VM that could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum VmError {
    #[error("could not create the JavaScript context: {0}")]
    Context(String),
    #[error("{file}: {message}")]
    Compile { file: String, message: String },
    #[error("loading {file} failed: {error}")]
    Load { file: String, error: CallError },
}

/// The exported functions PostHog looks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Method {
    SetupPlugin,
    TeardownPlugin,
    ProcessEvent,
    ProcessEventBatch,
    OnEvent,
    ExportEvents,
    ComposeWebhook,
    RunEveryMinute,
    RunEveryHour,
    RunEveryDay,
    GetSettings,
}

impl Method {
    pub const ALL: [Method; 11] = [
        Self::SetupPlugin,
        Self::TeardownPlugin,
        Self::ProcessEvent,
        Self::ProcessEventBatch,
        Self::OnEvent,
        Self::ExportEvents,
        Self::ComposeWebhook,
        Self::RunEveryMinute,
        Self::RunEveryHour,
        Self::RunEveryDay,
        Self::GetSettings,
    ];

    /// Whether the server reads what the method returns (the others' results are dropped
    /// unread, as PostHog drops them, so a `setupPlugin` that returns a function or a cycle
    /// is fine).
    pub fn returns_data(self) -> bool {
        matches!(
            self,
            Self::ProcessEvent | Self::ProcessEventBatch | Self::ComposeWebhook | Self::GetSettings
        )
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::SetupPlugin => "setupPlugin",
            Self::TeardownPlugin => "teardownPlugin",
            Self::ProcessEvent => "processEvent",
            Self::ProcessEventBatch => "processEventBatch",
            Self::OnEvent => "onEvent",
            Self::ExportEvents => "exportEvents",
            Self::ComposeWebhook => "composeWebhook",
            Self::RunEveryMinute => "runEveryMinute",
            Self::RunEveryHour => "runEveryHour",
            Self::RunEveryDay => "runEveryDay",
            Self::GetSettings => "getSettings",
        }
    }
}

/// One loaded plugin config.
pub struct PluginVm {
    context: Context,
    identity: VmIdentity,
    limits: VmLimits,
    host: Rc<dyn PluginHost>,
    methods: Vec<(Method, JsObject)>,
    jobs: Vec<(String, JsObject)>,
    meta: JsValue,
    /// `__ps_target(__ps_args[0], …)` for one and two arguments, each compiled on first use:
    /// calls go through a script so that they run in boa's budgeted interpreter loop, which is
    /// what lets the deadline interrupt them. (A spread, `__ps_target(...__ps_args)`, would do
    /// for every count, but its iterator cost a quarter of a small plugin's call.)
    invokers: [Option<Script>; MAX_ARGS],
}

/// The most arguments a plugin method is called with: an event and `meta`. (Loading calls the
/// plugin's wrapper with three, `exports, module, require`, once, with a script of its own.)
const MAX_ARGS: usize = 2;

/// An argument of a call: JSON from the server (as a value or as text), or what an earlier
/// VM of the thread returned.
#[derive(Debug, Clone, Copy)]
pub enum CallArg<'a> {
    Json(&'a Value),
    Text(&'a str),
    /// An event's JSON text, as `Text`; its `properties` as they went in are kept in the cell
    /// (left `None` when the text needed repairing first, or has no `properties` object).
    Event(&'a str, &'a RefCell<Option<Originals>>),
    Plain(&'a Plain),
}

impl CallArg<'_> {
    fn to_js(self, context: &mut Context) -> Result<JsValue, CallError> {
        match self {
            Self::Json(value) => {
                plain::json_to_js(value, context).map_err(|error| CallError::unreadable(&error))
            }
            // Raw property text keeps what the client sent, which JSON.parse may take and
            // serde not (a lone surrogate escape, `1e400`).
            Self::Text(text) => {
                parse_like_javascript(text, |text| plain::text_to_js(text, context))
                    .map_err(|error| CallError::unreadable(&error))
            }
            Self::Event(text, originals) => {
                // Repaired text holds values other than the server's: only the first parse,
                // of the text as sent, keeps its properties.
                let mut first = true;
                let (value, kept) = parse_like_javascript(text, |text| {
                    let kept_here = std::mem::replace(&mut first, false);
                    plain::event_text_to_js(text, context)
                        .map(|(value, kept)| (value, kept.filter(|_| kept_here)))
                })
                .map_err(|error| CallError::unreadable(&error))?;
                *originals.borrow_mut() = kept;
                Ok(value)
            }
            Self::Plain(plain) => Ok(plain.to_js(context)),
        }
    }
}

impl std::fmt::Debug for PluginVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginVm")
            .field("identity", &self.identity)
            .field(
                "methods",
                &self
                    .methods
                    .iter()
                    .map(|(m, _)| m.name())
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

const TARGET: &str = "__ps_target";
const ARGS: &str = "__ps_args";

impl PluginVm {
    /// Builds the VM: runs the prelude, then the plugin's top-level code (which is where
    /// `require` of a module outside the allow-list fails), then finds its exports.
    pub fn load(
        identity: VmIdentity,
        source: &VmSource,
        config: &Value,
        attachments: &[Attachment],
        limits: VmLimits,
        host: Rc<dyn PluginHost>,
    ) -> Result<(Self, CallEffects), VmError> {
        let mut context = Context::builder()
            .build()
            .map_err(|e| VmError::Context(e.to_string()))?;
        {
            let runtime = context.runtime_limits_mut();
            runtime.set_loop_iteration_limit(limits.loop_iteration_limit);
            runtime.set_recursion_limit(limits.recursion_limit);
            runtime.set_stack_size_limit(limits.stack_size_limit);
        }
        boa_runtime::extensions::RuntimeExtension::register(
            boa_runtime::extensions::UrlExtension,
            None,
            &mut context,
        )
        .map_err(|e| VmError::Context(e.to_string()))?;

        let host_object =
            natives::natives(&mut context).map_err(|e| VmError::Context(e.to_string()))?;
        let prelude = Prelude::install(host_object, &mut context)
            .map_err(|e| VmError::Context(e.to_string()))?;

        let mut vm = Self {
            context,
            identity,
            limits,
            host,
            methods: Vec::new(),
            jobs: Vec::new(),
            meta: JsValue::undefined(),
            invokers: Default::default(),
        };
        let effects = vm.run_plugin_code(source, &prelude)?;
        vm.meta = vm
            .build_meta(config, attachments, &prelude)
            .map_err(|e| VmError::Context(e.to_string()))?;
        Ok((vm, effects))
    }

    pub fn identity(&self) -> &VmIdentity {
        &self.identity
    }

    pub fn has(&self, method: Method) -> bool {
        self.methods.iter().any(|(m, _)| *m == method)
    }

    pub fn methods(&self) -> impl Iterator<Item = Method> + '_ {
        self.methods.iter().map(|(m, _)| *m)
    }

    pub fn job_names(&self) -> impl Iterator<Item = &str> {
        self.jobs.iter().map(|(name, _)| name.as_str())
    }

    /// Calls an exported method with `args` followed by `meta`, drives the promise it returns,
    /// and, for a method whose result the server reads ([`Method::returns_data`]), converts it
    /// to JSON as `JSON.stringify` would (`None` for `undefined` or `null`; a function or a
    /// symbol is an error). Returns `Ok(None)` for the other methods and when the plugin does
    /// not export the method.
    pub fn call(
        &mut self,
        method: Method,
        args: &[&Value],
    ) -> (Result<Option<Value>, CallError>, CallEffects) {
        let args: Vec<CallArg<'_>> = args.iter().map(|arg| CallArg::Json(arg)).collect();
        let (result, effects) = self.call_plain(method, &args);
        (result.map(|value| value.map(|v| v.to_json())), effects)
    }

    /// [`PluginVm::call`], keeping the result as a [`Plain`] value, which the next VM of the
    /// thread takes without a round trip through JSON.
    pub fn call_plain(
        &mut self,
        method: Method,
        args: &[CallArg<'_>],
    ) -> (Result<Option<Plain>, CallError>, CallEffects) {
        let Some(function) = self
            .methods
            .iter()
            .find(|(m, _)| *m == method)
            .map(|(_, f)| f.clone())
        else {
            return (Ok(None), CallEffects::default());
        };
        self.call_function(function, method.name(), method.returns_data(), args)
    }

    /// Runs `jobs[name](payload, meta)`; what the job returns is not read, as in PostHog.
    pub fn call_job(
        &mut self,
        name: &str,
        payload: &Value,
    ) -> (Result<(), CallError>, CallEffects) {
        let Some(function) = self
            .jobs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, f)| f.clone())
        else {
            let error = CallError::Thrown {
                name: "Error".into(),
                message: format!("the plugin has no job named {name:?}"),
            };
            return (Err(error), CallEffects::default());
        };
        let (result, effects) =
            self.call_function(function, "job", false, &[CallArg::Json(payload)]);
        (result.map(|_| ()), effects)
    }

    fn call_function(
        &mut self,
        function: JsObject,
        method: &'static str,
        keep_result: bool,
        args: &[CallArg<'_>],
    ) -> (Result<Option<Plain>, CallError>, CallEffects) {
        let deadline = Instant::now() + self.limits.task_timeout;
        natives::begin_call(
            self.host.clone(),
            self.identity.clone(),
            deadline,
            method,
            self.limits.memory_limit_bytes,
        );
        let result = self.invoke(function, args, keep_result, deadline);
        let effects = natives::end_call();
        (result, effects)
    }

    fn invoke(
        &mut self,
        function: JsObject,
        args: &[CallArg<'_>],
        keep_result: bool,
        deadline: Instant,
    ) -> Result<Option<Plain>, CallError> {
        let context = &mut self.context;
        let mut values = Vec::with_capacity(args.len() + 1);
        for arg in args {
            values.push(arg.to_js(context)?);
        }
        values.push(self.meta.clone());
        let invoker = invoker(&mut self.invokers, values.len(), context)?;
        let array = JsArray::from_iter(values, context);
        let global = context.global_object();
        global
            .set(js_string!(TARGET), function, false, context)
            .and_then(|_| global.set(js_string!(ARGS), array, false, context))
            .map_err(|e| thrown(e, context))?;

        let value = run_with_deadline(&invoker, context, deadline, self.limits.task_timeout)?;
        let value = settle(value, context, deadline, self.limits.task_timeout)?;
        if !keep_result || value.is_null_or_undefined() {
            return Ok(None);
        }
        match Plain::export(&value, context).map_err(|e| thrown(e, context))? {
            Some(plain) => Ok(Some(plain)),
            // A function, a symbol, or a `toJSON` that gives `undefined`: JSON has nothing for
            // it, and reading it as `undefined` would drop an event. It is a plugin bug, which
            // PostHog counts as a failed call (its team_id check fails) and so does this.
            None => Err(CallError::Thrown {
                name: "TypeError".into(),
                message: format!(
                    "the plugin returned a {} value, which JSON cannot hold",
                    value.type_of()
                ),
            }),
        }
    }

    fn run_plugin_code(
        &mut self,
        source: &VmSource,
        prelude: &Prelude,
    ) -> Result<CallEffects, VmError> {
        let context = &mut self.context;
        let load_error = |error: CallError| VmError::Load {
            file: source.file_name.clone(),
            error,
        };
        let mut wrapped = String::with_capacity(source.code.len() + 512);
        wrapped.push_str("(function (exports, module, require) {\n");
        wrapped.push_str(&source.code);
        // A plain script declares its methods at top level; hand them out by name. Only names
        // the code can declare are asked for: the others would only cost parsing, about 50 k
        // instructions each (boa descends its whole expression grammar for each part). A name
        // left out is still looked up on the global object below, as `typeof` would have.
        let asked = AskedNames::of(&source.code);
        wrapped.push_str("\n;return {");
        for method in EXPORT_NAMES {
            if asked.includes(method) {
                wrapped.push_str(&format!(
                    "{method}: typeof {method} === 'undefined' ? undefined : {method},"
                ));
            }
        }
        wrapped.push_str("}\n})");
        let function = context
            .eval(Source::from_bytes(wrapped.as_bytes()))
            .map_err(|e| VmError::Compile {
                file: source.file_name.clone(),
                message: e.to_string(),
            })?;
        let function = function
            .as_object()
            .ok_or_else(|| VmError::Context("the plugin wrapper is not a function".into()))?;

        let exports = JsObject::with_object_proto(context.intrinsics());
        let module = JsObject::with_object_proto(context.intrinsics());
        module
            .set(js_string!("exports"), exports.clone(), false, context)
            .map_err(|e| VmError::Context(e.to_string()))?;
        let require = prelude.require();

        let deadline = Instant::now() + self.limits.task_timeout;
        natives::begin_call(
            self.host.clone(),
            self.identity.clone(),
            deadline,
            "load",
            self.limits.memory_limit_bytes,
        );
        let locals = {
            let args = [exports.clone().into(), module.clone().into(), require];
            let invoker = invoker_script(args.len(), context);
            let array = JsArray::from_iter(args, context);
            let global = context.global_object();
            global
                .set(js_string!(TARGET), function, false, context)
                .and_then(|_| global.set(js_string!(ARGS), array, false, context))
                .map_err(|e| thrown(e, context))
                .and_then(|_| {
                    run_with_deadline(&invoker?, context, deadline, self.limits.task_timeout)
                })
        };
        let effects = natives::end_call();
        let locals = locals.map_err(load_error)?;

        let found = ExportSources::new(&module, &exports, locals, context)
            .map_err(|e| load_error(thrown(e, context)))?;
        let find = |name: &str, context: &mut Context| -> JsResult<JsValue> {
            let value = found.find(name, context)?;
            if value.is_undefined() && !asked.includes(name) {
                // Set on the global object under a name built at run time
                // (`globalThis['process' + 'Event'] = ...`), which `typeof` finds too.
                return context.global_object().get(JsString::from(name), context);
            }
            Ok(value)
        };
        for method in Method::ALL {
            let value = find(method.name(), context).map_err(|e| load_error(thrown(e, context)))?;
            if let Some(function) = value.as_callable() {
                self.methods.push((method, function.clone()));
            }
        }
        let jobs = find("jobs", context).map_err(|e| load_error(thrown(e, context)))?;
        if let Some(jobs) = jobs.as_object() {
            for key in jobs
                .own_property_keys(context)
                .map_err(|e| load_error(thrown(e, context)))?
            {
                let PropertyKey::String(name) = &key else {
                    continue;
                };
                let value = jobs
                    .get(key.clone(), context)
                    .map_err(|e| load_error(thrown(e, context)))?;
                if let Some(function) = value.as_callable() {
                    self.jobs
                        .push((name.to_std_string_escaped(), function.clone()));
                }
            }
        }
        Ok(effects)
    }

    fn build_meta(
        &mut self,
        config: &Value,
        attachments: &[Attachment],
        prelude: &Prelude,
    ) -> JsResult<JsValue> {
        let context = &mut self.context;
        let meta = JsObject::with_object_proto(context.intrinsics());
        let config = JsValue::from_json(config, context)?;
        meta.set(js_string!("config"), config, false, context)?;
        meta.set(
            js_string!("global"),
            JsObject::with_object_proto(context.intrinsics()),
            false,
            context,
        )?;

        // Buffer is compiled only for configs that have attachments.
        let buffer_prototype = if attachments.is_empty() {
            None
        } else {
            prelude
                .buffer(context)?
                .as_object()
                .map(|b| b.get(js_string!("prototype"), context))
                .transpose()?
                .and_then(|p| p.as_object())
        };
        let attachment_map = JsObject::with_object_proto(context.intrinsics());
        for attachment in attachments {
            let entry = JsObject::with_object_proto(context.intrinsics());
            entry.set(
                js_string!("content_type"),
                JsString::from(attachment.content_type.as_str()),
                false,
                context,
            )?;
            entry.set(
                js_string!("file_name"),
                JsString::from(attachment.file_name.as_str()),
                false,
                context,
            )?;
            let contents = JsUint8Array::from_iter(attachment.contents.iter().copied(), context)?;
            let contents: JsObject = contents.into();
            if let Some(prototype) = &buffer_prototype {
                contents.set_prototype(Some(prototype.clone()));
            }
            entry.set(js_string!("contents"), contents, false, context)?;
            attachment_map.set(
                JsString::from(attachment.key.as_str()),
                entry,
                false,
                context,
            )?;
        }
        meta.set(js_string!("attachments"), attachment_map, false, context)?;
        prelude.add_meta_apis(&meta, context)?;
        Ok(meta.into())
    }
}

/// The names the plugin wrapper may hand out: the methods, then `jobs`.
const EXPORT_NAMES: [&str; Method::ALL.len() + 1] = {
    let mut names = ["jobs"; Method::ALL.len() + 1];
    let mut i = 0;
    while i < Method::ALL.len() {
        names[i] = Method::ALL[i].name();
        i += 1;
    }
    names
};

/// Which of [`EXPORT_NAMES`] the plugin's code may declare at top level, read once per load:
/// the names it spells out, or all of them when it could declare one without spelling it (an
/// escaped identifier, or code it builds and evaluates).
struct AskedNames([bool; EXPORT_NAMES.len()]);

impl AskedNames {
    fn of(code: &str) -> Self {
        let hidden = code.contains("\\u") || code.contains("eval") || code.contains("Function");
        Self(EXPORT_NAMES.map(|name| hidden || code.contains(name)))
    }

    fn includes(&self, name: &str) -> bool {
        EXPORT_NAMES
            .iter()
            .zip(self.0)
            .any(|(known, asked)| asked && *known == name)
    }
}

/// The invoker script for `arity` arguments, compiled the first time it is needed.
fn invoker(
    invokers: &mut [Option<Script>; MAX_ARGS],
    arity: usize,
    context: &mut Context,
) -> Result<Script, CallError> {
    let limit_error = || CallError::Limit(format!("more than {MAX_ARGS} arguments"));
    let slot = arity
        .checked_sub(1)
        .and_then(|index| invokers.get_mut(index))
        .ok_or_else(limit_error)?;
    if let Some(script) = slot {
        return Ok(script.clone());
    }
    let script = invoker_script(arity, context)?;
    *slot = Some(script.clone());
    Ok(script)
}

/// Compiles `__ps_target(__ps_args[0], …)` for `arity` arguments.
fn invoker_script(arity: usize, context: &mut Context) -> Result<Script, CallError> {
    let args: Vec<String> = (0..arity).map(|i| format!("{ARGS}[{i}]")).collect();
    let code = format!("{TARGET}({})", args.join(", "));
    Script::parse(Source::from_bytes(code.as_bytes()), None, context)
        .map_err(|e| thrown(e, context))
}

/// Evaluates `script` in boa's budgeted loop, checking the deadline each time the budget runs
/// out. Dropping the future abandons the evaluation mid-way; the caller then treats the VM as
/// poisoned (see `CallError::poisons_vm`).
fn run_with_deadline(
    script: &Script,
    context: &mut Context,
    deadline: Instant,
    timeout: Duration,
) -> Result<JsValue, CallError> {
    let outcome = {
        let mut future = pin!(script.evaluate_async_with_budget(context, DEADLINE_CHECK_BUDGET));
        let mut task_context = TaskContext::from_waker(Waker::noop());
        loop {
            match future.as_mut().poll(&mut task_context) {
                Poll::Ready(result) => break result,
                Poll::Pending if Instant::now() >= deadline => {
                    return Err(CallError::Timeout(timeout));
                }
                Poll::Pending => {}
            }
        }
    };
    outcome.map_err(|e| thrown(e, context))
}

/// Drives a returned promise to completion: runs queued jobs, then due timers, until it settles,
/// the deadline passes, or nothing is left that could settle it.
fn settle(
    value: JsValue,
    context: &mut Context,
    deadline: Instant,
    timeout: Duration,
) -> Result<JsValue, CallError> {
    let Some(promise) = value
        .as_object()
        .and_then(|o| JsPromise::from_object(o.clone()).ok())
    else {
        return Ok(value);
    };
    loop {
        context.run_jobs().map_err(|e| thrown(e, context))?;
        match promise.state() {
            PromiseState::Fulfilled(value) => return Ok(value),
            PromiseState::Rejected(reason) => {
                return Err(thrown(JsError::from_opaque(reason), context));
            }
            PromiseState::Pending => {}
        }
        let Some((due, callback)) = natives::next_timer() else {
            return Err(CallError::NeverSettled);
        };
        if due > deadline {
            return Err(CallError::Timeout(timeout));
        }
        let wait = due.saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        if Instant::now() >= deadline {
            return Err(CallError::Timeout(timeout));
        }
        callback
            .call(&JsValue::undefined(), &[], context)
            .map_err(|e| thrown(e, context))?;
    }
}

/// Turns a boa error into what PostHog reports: the error's name and message, or the thrown
/// value itself when a plugin throws a non-error (plugins throw plain strings).
fn thrown(error: JsError, context: &mut Context) -> CallError {
    if error.as_engine().is_some() {
        return CallError::Limit(error.to_string());
    }
    let display = error.to_string();
    let value = match error.into_opaque(context) {
        Ok(value) => value,
        Err(_) => return CallError::Limit(display),
    };
    if let Some(object) = value.as_object() {
        let name = object
            .get(js_string!("name"), context)
            .ok()
            .filter(|v| !v.is_undefined());
        let message = object
            .get(js_string!("message"), context)
            .ok()
            .filter(|v| !v.is_undefined());
        if let (Some(name), Some(message)) = (name, message) {
            return CallError::Thrown {
                name: name
                    .to_string(context)
                    .map(|s| s.to_std_string_escaped())
                    .unwrap_or_default(),
                message: message
                    .to_string(context)
                    .map(|s| s.to_std_string_escaped())
                    .unwrap_or_default(),
            };
        }
    }
    let message = match value.to_string(context) {
        Ok(text) => text.to_std_string_escaped(),
        Err(_) => display,
    };
    CallError::Thrown {
        name: "Error".into(),
        message,
    }
}
