//! What every plugin VM holds before the plugin's own code runs: the globals `posthog`,
//! `RetryError`, `setTimeout` and `clearTimeout`; `console`, `fetch` and `Buffer`, compiled on
//! first use; `require` and its allow-list; `meta`'s host APIs; and how a plugin's exports are
//! found.
//!
//! The core is built with boa's API rather than run as JavaScript. Parsing it was about 2.9 M
//! of the 9.7 M instructions a VM took to build (callgrind, `plugin_vm memory --variant
//! plugin`), and with thousands of configs VMs are built again whenever a torn-down config gets
//! work (`bench/results/plugins.md`). What the core compiles lazily, the *sections*, stays
//! JavaScript (`prelude/*.js`): each evaluates to `function (host, load)` and is compiled the
//! first time a plugin reaches for it, since a plugin touches two or three of them.

use boa_engine::gc::{Gc, GcRefCell};
use boa_engine::object::builtins::JsFunction;
use boa_engine::object::{ConstructorBuilder, FunctionObjectBuilder, ObjectInitializer};
use boa_engine::property::{Attribute, PropertyDescriptor, PropertyKey};
use boa_engine::{
    Context, JsNativeError, JsObject, JsResult, JsString, JsValue, NativeFunction, Source,
    js_string,
};

use super::natives;

/// A section's source, by the name the core loads it with; each evaluates to
/// `function (host, load)`.
pub fn section(name: &str) -> Option<&'static str> {
    Some(match name {
        "api" => include_str!("prelude/api.js"),
        "buffer" => include_str!("prelude/buffer.js"),
        "console" => include_str!("prelude/console.js"),
        "crypto" => include_str!("prelude/crypto.js"),
        "fetch" => include_str!("prelude/fetch.js"),
        "cache" => include_str!("prelude/cache.js"),
        "storage" => include_str!("prelude/storage.js"),
        "utils" => include_str!("prelude/utils.js"),
        "geoip" => include_str!("prelude/geoip.js"),
        "jobs" => include_str!("prelude/jobs.js"),
        _ => return None,
    })
}

/// `meta`'s host APIs, each a section.
const META_APIS: [&str; 5] = ["cache", "storage", "utils", "geoip", "jobs"];

// Where the core's state object keeps what the natives below share.
const HOST: &str = "host";
const SECTIONS: &str = "sections";
const LOAD: &str = "load";

/// The core of one VM, for the loader: `require` for the plugin's wrapper, and the state the
/// lazy properties load their sections from.
pub struct Prelude {
    require: JsFunction,
    /// A null-prototype object no plugin can reach: the host natives, the compiled sections
    /// and the `load` function sections are given.
    state: JsObject,
}

impl Prelude {
    /// Installs the globals in `context`; `host` is the natives object sections are given.
    pub fn install(host: JsObject, context: &mut Context) -> JsResult<Self> {
        let state = JsObject::with_null_proto();
        state.set(js_string!(HOST), host, true, context)?;
        state.set(
            js_string!(SECTIONS),
            JsObject::with_null_proto(),
            true,
            context,
        )?;
        let load = FunctionObjectBuilder::new(
            context.realm(),
            NativeFunction::from_copy_closure_with_captures(load, state.clone()),
        )
        .name(js_string!("load"))
        .length(1)
        .build();
        state.set(js_string!(LOAD), load, true, context)?;

        let retry_error = retry_error_class(context);
        let global = context.global_object();
        let url = ObjectInitializer::new(context).build();
        for name in ["URL", "URLSearchParams"] {
            let value = global.get(js_string!(name), context)?;
            url.set(js_string!(name), value, true, context)?;
        }
        let scaffold = ObjectInitializer::new(context)
            .property(
                js_string!("RetryError"),
                retry_error.clone(),
                Attribute::all(),
            )
            .build();
        let modules = ObjectInitializer::new(context)
            .property(js_string!("url"), url, Attribute::all())
            .property(
                js_string!("@posthog/plugin-scaffold"),
                scaffold,
                Attribute::all(),
            )
            .build();
        define_lazy(&modules, "crypto", "crypto", true, &state, context)?;
        define_lazy(&modules, "node-fetch", "fetch", true, &state, context)?;
        let require = FunctionObjectBuilder::new(
            context.realm(),
            NativeFunction::from_copy_closure_with_captures(require, modules),
        )
        .name(js_string!("require"))
        .length(1)
        .build();

        // A method of an object literal: enumerable, so `{...posthog}` keeps it.
        let capture = function(context, "capture", 2, capture);
        let posthog = ObjectInitializer::new(context)
            .property(js_string!("capture"), capture, Attribute::all())
            .build();
        define_lazy(&posthog, "api", "api", true, &state, context)?;
        let set_timeout = function(context, "setTimeout", 2, set_timeout);
        let clear_timeout = function(context, "clearTimeout", 1, natives::clear_timeout);
        let globals: [(&str, JsValue); 4] = [
            ("posthog", posthog.into()),
            ("RetryError", retry_error.into()),
            ("setTimeout", set_timeout.into()),
            ("clearTimeout", clear_timeout.into()),
        ];
        for (name, value) in globals {
            global.define_property_or_throw(
                js_string!(name),
                PropertyDescriptor::builder()
                    .value(value)
                    .writable(true)
                    .enumerable(false)
                    .configurable(true),
                context,
            )?;
        }
        define_lazy(&global, "console", "console", false, &state, context)?;
        define_lazy(&global, "fetch", "fetch", false, &state, context)?;
        define_lazy(&global, "Buffer", "buffer", false, &state, context)?;
        Ok(Self { require, state })
    }

    /// The `require` a plugin's code gets.
    pub(super) fn require(&self) -> JsValue {
        self.require.clone().into()
    }

    /// Puts `meta`'s host APIs on `meta`, each compiled when the plugin first reaches for it.
    pub(super) fn add_meta_apis(&self, meta: &JsObject, context: &mut Context) -> JsResult<()> {
        for name in META_APIS {
            define_lazy(meta, name, name, true, &self.state, context)?;
        }
        Ok(())
    }

    /// The `Buffer` class (compiled now if no one has used it yet).
    pub(super) fn buffer(&self, context: &mut Context) -> JsResult<JsValue> {
        load_section(&self.state, js_string!("buffer"), context)
    }
}

/// Where PostHog reads a plugin's exports from, in order: `module.exports`, then
/// `exports.default`, then the original `exports` object, then the top-level declarations of
/// a plain script (`locals`).
pub(super) struct ExportSources([JsValue; 4]);

impl ExportSources {
    pub(super) fn new(
        module: &JsObject,
        exports: &JsObject,
        locals: JsValue,
        context: &mut Context,
    ) -> JsResult<Self> {
        let module_exports = module.get(js_string!("exports"), context)?;
        // `module.exports && module.exports.default`, as PostHog writes it.
        let default = if module_exports.to_boolean() {
            property(&module_exports, js_string!("default"), context)?
        } else {
            module_exports.clone()
        };
        Ok(Self([
            module_exports,
            default,
            exports.clone().into(),
            locals,
        ]))
    }

    /// The first source's `name` that is not `undefined`, or `undefined`.
    pub(super) fn find(&self, name: &str, context: &mut Context) -> JsResult<JsValue> {
        for source in &self.0 {
            if source.is_null_or_undefined() {
                continue;
            }
            let value = property(source, js_string!(name), context)?;
            if !value.is_undefined() {
                return Ok(value);
            }
        }
        Ok(JsValue::undefined())
    }
}

/// `value[key]` for any value but `null` and `undefined`, as JavaScript reads it.
fn property(value: &JsValue, key: JsString, context: &mut Context) -> JsResult<JsValue> {
    value.to_object(context)?.get(key, context)
}

fn function(
    context: &mut Context,
    name: &'static str,
    length: usize,
    body: fn(&JsValue, &[JsValue], &mut Context) -> JsResult<JsValue>,
) -> JsFunction {
    FunctionObjectBuilder::new(context.realm(), NativeFunction::from_fn_ptr(body))
        .name(js_string!(name))
        .length(length)
        .build()
}

/// `load(name)`: the section's value, compiled and run the first time it is asked for.
fn load(
    _: &JsValue,
    args: &[JsValue],
    state: &JsObject,
    context: &mut Context,
) -> JsResult<JsValue> {
    let name = args
        .first()
        .cloned()
        .unwrap_or_default()
        .to_string(context)?;
    load_section(state, name, context)
}

fn load_section(state: &JsObject, name: JsString, context: &mut Context) -> JsResult<JsValue> {
    let sections = state.get(js_string!(SECTIONS), context)?;
    let sections = sections
        .as_object()
        .ok_or_else(|| JsNativeError::typ().with_message("the prelude lost its sections"))?;
    if sections.has_own_property(name.clone(), context)? {
        return sections.get(name, context);
    }
    let source = section(&name.to_std_string_escaped()).ok_or_else(|| {
        JsNativeError::typ().with_message(format!(
            "the prelude has no section {:?}",
            name.to_std_string_escaped()
        ))
    })?;
    let factory = context.eval(Source::from_bytes(source))?;
    let host = state.get(js_string!(HOST), context)?;
    let load = state.get(js_string!(LOAD), context)?;
    let factory = factory
        .as_callable()
        .ok_or_else(|| JsNativeError::typ().with_message("a prelude section is no function"))?;
    let value = factory.call(&JsValue::undefined(), &[host, load], context)?;
    sections.create_data_property_or_throw(name, value.clone(), context)?;
    Ok(value)
}

/// Defines `target[name]` as the value of `section`, loaded on first read; assigning replaces
/// it. It stays an accessor: boa's inline caches keep treating a redefined global property of
/// the same name as the accessor it was, so it cannot become a data property later.
fn define_lazy(
    target: &JsObject,
    name: &str,
    section: &str,
    enumerable: bool,
    state: &JsObject,
    context: &mut Context,
) -> JsResult<()> {
    let value: Gc<GcRefCell<Option<JsValue>>> = Gc::new(GcRefCell::new(None));
    let get = FunctionObjectBuilder::new(
        context.realm(),
        NativeFunction::from_copy_closure_with_captures(
            |_,
             _,
             (value, state, section): &(Gc<GcRefCell<Option<JsValue>>>, JsObject, JsString),
             context| {
                let loaded = value.borrow().clone();
                if let Some(loaded) = loaded {
                    return Ok(loaded);
                }
                let loaded = load_section(state, section.clone(), context)?;
                *value.borrow_mut() = Some(loaded.clone());
                Ok(loaded)
            },
            (value.clone(), state.clone(), JsString::from(section)),
        ),
    )
    .name(js_string!("get"))
    .build();
    let set = FunctionObjectBuilder::new(
        context.realm(),
        NativeFunction::from_copy_closure_with_captures(
            |_, args, value: &Gc<GcRefCell<Option<JsValue>>>, _| {
                *value.borrow_mut() = Some(args.first().cloned().unwrap_or_default());
                Ok(JsValue::undefined())
            },
            value,
        ),
    )
    .name(js_string!("set"))
    .length(1)
    .build();
    target.define_property_or_throw(
        JsString::from(name),
        PropertyDescriptor::builder()
            .get(get)
            .set(set)
            .enumerable(enumerable)
            .configurable(true),
        context,
    )?;
    Ok(())
}

/// `require(name)`: one of the allowed modules, or an Error naming them.
fn require(
    _: &JsValue,
    args: &[JsValue],
    modules: &JsObject,
    context: &mut Context,
) -> JsResult<JsValue> {
    let name = args.first().cloned().unwrap_or_default();
    let key = name.to_property_key(context)?;
    if modules.has_own_property(key.clone(), context)? {
        return modules.get(key, context);
    }
    let allowed: Vec<String> = modules
        .own_property_keys(context)?
        .into_iter()
        .filter_map(|key| match key {
            PropertyKey::String(name) => Some(name.to_std_string_escaped()),
            PropertyKey::Index(index) => Some(index.get().to_string()),
            PropertyKey::Symbol(_) => None,
        })
        .collect();
    let name = name.to_string(context)?.to_std_string_escaped();
    Err(JsNativeError::error()
        .with_message(format!(
            "Cannot find module '{name}': plugins may import only {}",
            allowed.join(", ")
        ))
        .into())
}

/// `class RetryError extends Error { constructor(message) { super(message); this.name =
/// 'RetryError' } }`, which plugins throw to have PostHog call them again.
fn retry_error_class(context: &mut Context) -> JsObject {
    let error = context.intrinsics().constructors().error();
    let (parent, parent_prototype) = (error.constructor(), error.prototype());
    let mut class = ConstructorBuilder::new(context, NativeFunction::from_fn_ptr(retry_error));
    class
        .name("RetryError")
        .length(1)
        .inherit(parent_prototype)
        .custom_prototype(parent);
    class.build().constructor()
}

fn retry_error(this: &JsValue, args: &[JsValue], context: &mut Context) -> JsResult<JsValue> {
    // Constructed, `this` is the new target (a subclass of RetryError, or RetryError itself).
    let new_target = this
        .as_object()
        .filter(|target| target.is_constructor())
        .ok_or_else(|| {
            JsNativeError::typ()
                .with_message("Class constructor RetryError cannot be invoked without 'new'")
        })?;
    let error = context.intrinsics().constructors().error().constructor();
    let message = args.first().cloned().unwrap_or_default();
    let object = error.construct(&[message], Some(&new_target), context)?;
    object.set(js_string!("name"), js_string!("RetryError"), true, context)?;
    Ok(object.into())
}

/// `posthog.capture(event, properties)`: the event name as `String(event)` makes it (a symbol
/// too), then the host's capture.
fn capture(_: &JsValue, args: &[JsValue], context: &mut Context) -> JsResult<JsValue> {
    let event = args.first().cloned().unwrap_or_default();
    let event: JsValue = match event.as_symbol() {
        Some(symbol) => symbol.descriptive_string().into(),
        None => event.to_string(context)?.into(),
    };
    let properties = args.get(1).cloned().unwrap_or_default();
    natives::capture(&JsValue::undefined(), &[event, properties], context)
}

/// `setTimeout(fn, ms, ...args)`: `fn(...args)` after `ms` (0 unless a number). A callback
/// that is not a function fails when it is due (as with the JavaScript core this replaced;
/// Node refuses it at once).
fn set_timeout(_: &JsValue, args: &[JsValue], context: &mut Context) -> JsResult<JsValue> {
    let target = args.first().cloned().unwrap_or_default();
    let rest: Vec<JsValue> = args.iter().skip(2).cloned().collect();
    let callback = FunctionObjectBuilder::new(
        context.realm(),
        NativeFunction::from_copy_closure_with_captures(
            |_, _, (target, rest): &(JsValue, Vec<JsValue>), context| match target.as_callable() {
                Some(function) => function.call(&JsValue::undefined(), rest, context),
                None => Err(JsNativeError::typ()
                    .with_message("the setTimeout callback is not a function")
                    .into()),
            },
            (target, rest),
        ),
    )
    .build();
    let ms = match args.get(1) {
        Some(ms) if ms.is_number() => ms.clone(),
        _ => JsValue::from(0),
    };
    natives::set_timeout(&JsValue::undefined(), &[callback.into(), ms], context)
}
