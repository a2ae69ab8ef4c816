//! Turns a plugin's main file (JavaScript or TypeScript, ESM or CommonJS) into
//! the body of a CommonJS function `(function (exports, module, require) { … })`.
//!
//! TypeScript is stripped by oxc's transformer without type checking. oxc 0.146
//! has no ESM → CommonJS transform, so the transformed code is printed, parsed
//! again as plain JavaScript, and its top-level `import`/`export` statements are
//! rewritten by splicing text at their spans. Syntax newer than ES2015 is kept
//! as is because the engine running plugins supports it.

use std::path::Path;

use oxc::allocator::Allocator;
use oxc::ast::ast::{
    Declaration, ExportDefaultDeclarationKind, ImportDeclaration, ImportDeclarationSpecifier,
    ModuleDeclaration, ModuleExportName,
};
use oxc::codegen::Codegen;
use oxc::diagnostics::OxcDiagnostic;
use oxc::parser::Parser;
use oxc::semantic::SemanticBuilder;
use oxc::span::{GetSpan, SourceType, Span};
use oxc::transformer::{TransformOptions, Transformer};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranspileError {
    /// `message` starts with `line:column: ` of the first error.
    #[error("{file}:{message}")]
    Syntax { file: String, message: String },
    /// `message` starts with `line:column: ` of the first error.
    #[error("{file}:{message}")]
    Transform { file: String, message: String },
    /// Valid only as an ES module (top-level `await`, `import.meta`), or invalid
    /// JavaScript that the TypeScript parser let through (two default exports).
    #[error("{file}: unsupported in a CommonJS plugin: {message}")]
    Unsupported { file: String, message: String },
}

/// Binding for `export default <expression>` and anonymous default functions and classes.
const DEFAULT_EXPORT: &str = "__ps_default_export";

/// Same rule as Babel's `interopRequireDefault`: CommonJS modules are their own default export.
const DEFAULT_HELPER: &str =
    "function __ps_default(m) { return m && m.__esModule ? m.default : m; }\n";

/// `export * from` copies every name but `default`; names exported locally win.
const REEXPORT_HELPER: &str = "function __ps_reexport(target, source) { Object.keys(source).forEach((name) => { if (name !== \"default\" && name !== \"__esModule\" && !Object.prototype.hasOwnProperty.call(target, name)) Object.defineProperty(target, name, { enumerable: true, get: () => source[name] }); }); }\n";

pub fn transpile(source: &str, file_name: &str) -> Result<String, TranspileError> {
    let allocator = Allocator::default();
    let parsed = Parser::new(&allocator, source, source_type_for(file_name)).parse();
    if let Some(error) = parsed.diagnostics.errors().next() {
        return Err(TranspileError::Syntax {
            file: file_name.to_owned(),
            message: located(source, error),
        });
    }
    let mut program = parsed.program;
    // A hashbang is only valid at the very start of a file, not inside the host's wrapper.
    program.hashbang = None;

    // Enum member values must be evaluated here or the transformer panics on `enum`.
    let semantic = SemanticBuilder::new().with_enum_eval(true).build(&program);
    if let Some(error) = semantic.diagnostics.errors().next() {
        return Err(TranspileError::Syntax {
            file: file_name.to_owned(),
            message: located(source, error),
        });
    }
    let transformed = Transformer::new(
        &allocator,
        Path::new(file_name),
        &TransformOptions::default(),
    )
    .build_with_scoping(semantic.semantic.into_scoping(), &mut program);
    if let Some(error) = transformed.diagnostics.errors().next() {
        return Err(TranspileError::Transform {
            file: file_name.to_owned(),
            message: located(source, error),
        });
    }

    let code = Codegen::new().build(&program).code;
    if program.source_type.is_module() {
        to_commonjs(&code, file_name)
    } else {
        Ok(code)
    }
}

fn source_type_for(file_name: &str) -> SourceType {
    let extension = Path::new(file_name)
        .extension()
        .and_then(|extension| extension.to_str())
        .unwrap_or_default();
    // Other files are ESM only when they use ESM syntax, so that CommonJS
    // plugins keep sloppy-mode semantics.
    match extension {
        "mts" => SourceType::ts().with_module(true),
        "ts" | "cts" => SourceType::ts(),
        "mjs" => SourceType::mjs(),
        _ => SourceType::unambiguous(),
    }
}

/// `line:column: message`, both 1-based, column counted in characters.
fn located(source: &str, error: &OxcDiagnostic) -> String {
    let label = error
        .labels
        .iter()
        .find(|label| label.primary())
        .or_else(|| error.labels.first());
    // oxc attaches a span to every parser and transformer error; the start of
    // the file is a last resort that keeps the message format uniform.
    let offset = label.map_or(0, |label| label.offset() as usize);
    let before = source.get(..offset).unwrap_or(source);
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let line = before.matches('\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    format!("{line}:{column}: {}", error.message)
}

/// Rewrites the top-level module declarations of printed ESM JavaScript (from `file_name`).
fn to_commonjs(code: &str, file_name: &str) -> Result<String, TranspileError> {
    // A position in printed code would point nowhere useful in the plugin's source.
    let unsupported = |error: &OxcDiagnostic| TranspileError::Unsupported {
        file: file_name.to_owned(),
        message: error.message.to_string(),
    };
    let allocator = Allocator::default();
    let parsed = Parser::new(&allocator, code, SourceType::mjs()).parse();
    if let Some(error) = parsed.diagnostics.errors().next() {
        return Err(unsupported(error));
    }
    let mut rewriter = Rewriter {
        code,
        ..Rewriter::default()
    };
    let mut copied_up_to = 0;
    for statement in &parsed.program.body {
        let Some(declaration) = statement.as_module_declaration() else {
            continue;
        };
        let span = statement.span();
        rewriter
            .body
            .push_str(&code[copied_up_to..span.start as usize]);
        copied_up_to = span.end as usize;
        let body_len = rewriter.body.len();
        rewriter.rewrite(declaration, span);
        // Drop the line a moved or erased statement leaves behind.
        if rewriter.body.len() == body_len && code[copied_up_to..].starts_with('\n') {
            copied_up_to += 1;
        }
    }
    rewriter.body.push_str(&code[copied_up_to..]);
    let commonjs = rewriter.finish();
    // Catches what is valid only in ESM, like top-level `await` and `import.meta`,
    // here rather than when the engine compiles the plugin.
    let checked = Parser::new(&allocator, &commonjs, SourceType::cjs()).parse();
    match checked.diagnostics.errors().next() {
        Some(error) => Err(unsupported(error)),
        None => Ok(commonjs),
    }
}

#[derive(Default)]
struct Rewriter<'c> {
    code: &'c str,
    /// Getters rather than copied values keep exports live, and defining them
    /// before any `require` makes them visible to dependency cycles.
    exports: String,
    /// Imports are hoisted above the body because ESM evaluates dependencies first.
    requires: String,
    body: String,
    module_count: usize,
    uses_default_helper: bool,
    uses_reexport_helper: bool,
}

impl<'c> Rewriter<'c> {
    fn text(&self, span: Span) -> &'c str {
        &self.code[span.start as usize..span.end as usize]
    }

    fn rewrite(&mut self, declaration: &ModuleDeclaration, span: Span) {
        match declaration {
            ModuleDeclaration::ImportDeclaration(import) => self.import(import),
            ModuleDeclaration::ExportDeclaration(export) => {
                let declaration = &export.declaration;
                let start = declaration.span().start;
                self.body.push_str(self.text(Span::new(start, span.end)));
                match declaration {
                    Declaration::VariableDeclaration(variables) => {
                        for declarator in &variables.declarations {
                            for binding in declarator.id.get_binding_identifiers() {
                                self.export(&quoted(&binding.name), &binding.name);
                            }
                        }
                    }
                    other => {
                        if let Some(binding) = other.id() {
                            self.export(&quoted(&binding.name), &binding.name);
                        }
                    }
                }
            }
            ModuleDeclaration::ExportDefaultDeclaration(export) => {
                self.export_default(&export.declaration);
            }
            ModuleDeclaration::ExportNamedDeclaration(export) => {
                for specifier in &export.specifiers {
                    let key = self.key(&specifier.exported);
                    self.export(&key, &specifier.local.name());
                }
            }
            ModuleDeclaration::ExportFromDeclaration(export) => {
                let module = self.module_variable(export.source.span);
                for specifier in &export.specifiers {
                    let key = self.key(&specifier.exported);
                    let value = self.member(&module, &specifier.local);
                    self.export(&key, &value);
                }
            }
            ModuleDeclaration::ExportAllDeclaration(export) => match &export.exported {
                Some(exported) => {
                    let module = self.module_variable(export.source.span);
                    let key = self.key(exported);
                    self.export(&key, &module);
                }
                None => {
                    self.uses_reexport_helper = true;
                    let source = self.text(export.source.span);
                    self.requires
                        .push_str(&format!("__ps_reexport(exports, require({source}));\n"));
                }
            },
            // TypeScript-only forms cannot occur in printed JavaScript; keep them visible if they do.
            ModuleDeclaration::TSExportAssignment(_)
            | ModuleDeclaration::TSNamespaceExportDeclaration(_) => {
                self.body.push_str(self.text(span));
            }
        }
    }

    fn import(&mut self, import: &ImportDeclaration) {
        let source = self.text(import.source.span);
        let mut defaults = Vec::new();
        let mut namespaces = Vec::new();
        let mut named = Vec::new();
        for specifier in import.specifiers.iter().flatten() {
            match specifier {
                ImportDeclarationSpecifier::ImportDefaultSpecifier(default) => {
                    defaults.push(default.local.name);
                }
                ImportDeclarationSpecifier::ImportNamespaceSpecifier(namespace) => {
                    namespaces.push(namespace.local.name);
                }
                ImportDeclarationSpecifier::ImportSpecifier(specifier) => {
                    let local = specifier.local.name;
                    if specifier.imported.name() == "default" {
                        defaults.push(local);
                    } else {
                        named.push(match &specifier.imported {
                            ModuleExportName::StringLiteral(literal) => {
                                format!("{}: {local}", self.text(literal.span))
                            }
                            imported if imported.name() == local.as_str() => local.to_string(),
                            imported => format!("{}: {local}", imported.name()),
                        });
                    }
                }
            }
        }
        let uses = defaults.len() + namespaces.len() + usize::from(!named.is_empty());
        let module = match uses {
            0 => {
                self.requires.push_str(&format!("require({source});\n"));
                return;
            }
            1 => format!("require({source})"),
            _ => self.module_variable(import.source.span),
        };
        for local in defaults {
            self.uses_default_helper = true;
            self.requires
                .push_str(&format!("const {local} = __ps_default({module});\n"));
        }
        for local in namespaces {
            self.requires
                .push_str(&format!("const {local} = {module};\n"));
        }
        if !named.is_empty() {
            self.requires
                .push_str(&format!("const {{ {} }} = {module};\n", named.join(", ")));
        }
    }

    fn export_default(&mut self, declaration: &ExportDefaultDeclarationKind) {
        let text = self.text(declaration.span());
        let id = match declaration {
            ExportDefaultDeclarationKind::FunctionDeclaration(function) => function.id.as_ref(),
            ExportDefaultDeclarationKind::ClassDeclaration(class) => class.id.as_ref(),
            _ => None,
        };
        if let Some(id) = id {
            self.body.push_str(text);
            self.export("\"default\"", &id.name);
            return;
        }
        if let ExportDefaultDeclarationKind::FunctionDeclaration(function) = declaration {
            // Naming it keeps the declaration hoisted, as in ESM.
            let (head, rest) =
                text.split_at((function.params.span.start - function.span.start) as usize);
            self.body
                .push_str(&format!("{head} {DEFAULT_EXPORT}{rest}"));
        } else {
            self.body
                .push_str(&format!("const {DEFAULT_EXPORT} = {text};"));
        }
        self.export("\"default\"", DEFAULT_EXPORT);
    }

    /// `key` is a JavaScript string literal.
    fn export(&mut self, key: &str, value: &str) {
        self.exports.push_str(&format!(
            "Object.defineProperty(exports, {key}, {{ enumerable: true, get: () => {value} }});\n"
        ));
    }

    /// The name as a string literal or a property key, quoted as printed.
    fn key(&self, name: &ModuleExportName) -> String {
        match name {
            ModuleExportName::StringLiteral(literal) => self.text(literal.span).to_owned(),
            _ => quoted(&name.name()),
        }
    }

    fn member(&mut self, module: &str, name: &ModuleExportName) -> String {
        if name.name() == "default" {
            self.uses_default_helper = true;
            return format!("__ps_default({module})");
        }
        match name {
            ModuleExportName::StringLiteral(literal) => {
                format!("{module}[{}]", self.text(literal.span))
            }
            _ => format!("{module}.{}", name.name()),
        }
    }

    fn module_variable(&mut self, source: Span) -> String {
        let variable = format!("__ps_m{}", self.module_count);
        self.module_count += 1;
        self.requires.push_str(&format!(
            "const {variable} = require({});\n",
            self.text(source)
        ));
        variable
    }

    fn finish(self) -> String {
        let mut out = String::from(
            "\"use strict\";\nObject.defineProperty(exports, \"__esModule\", { value: true });\n",
        );
        if self.uses_default_helper {
            out.push_str(DEFAULT_HELPER);
        }
        if self.uses_reexport_helper {
            out.push_str(REEXPORT_HELPER);
        }
        out.push_str(&self.exports);
        out.push_str(&self.requires);
        out.push_str(&self.body);
        out
    }
}

/// Identifiers never contain quotes or backslashes, so wrapping them is enough.
fn quoted(identifier: &str) -> String {
    format!("\"{identifier}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Transpiles and checks the result is a valid CommonJS function body,
    /// which rules out leftover `import`/`export` statements.
    fn cjs(source: &str, file_name: &str) -> String {
        let out = transpile(source, file_name).unwrap();
        let allocator = Allocator::default();
        let parsed = Parser::new(&allocator, &out, SourceType::cjs()).parse();
        assert!(
            parsed.diagnostics.is_empty(),
            "{:?}\n{out}",
            parsed.diagnostics
        );
        out
    }

    fn exports(out: &str, name: &str, value: &str) -> bool {
        out.contains(&format!(
            "Object.defineProperty(exports, \"{name}\", {{ enumerable: true, get: () => {value} }});"
        ))
    }

    #[test]
    fn realistic_typescript_plugin() {
        let source = r#"import { Plugin, PluginEvent, PluginMeta } from '@posthog/plugin-scaffold'
import { URL } from 'url'
enum Mode { A = 'a', B = 'b' }
interface Cfg { suffix: string }
type M = PluginMeta<{ config: Cfg }>
export async function setupPlugin({ global, config }: M) { global.suffix = config.suffix as string }
export function processEvent(event: PluginEvent, { global }: M): PluginEvent | null {
  const u = new URL(event.properties!['$current_url'] as string)
  const tags = new Set<string>()
  event.properties![`host_${Mode.A}`] = u.hostname
  return event
}
"#;
        let out = cjs(source, "index.ts");
        assert!(out.contains("const { URL } = require(\"url\");"), "{out}");
        assert!(!out.contains("plugin-scaffold"), "{out}");
        assert!(exports(&out, "setupPlugin", "setupPlugin"), "{out}");
        assert!(exports(&out, "processEvent", "processEvent"), "{out}");
        assert!(out.contains("async function setupPlugin({ global, config }) {"));
        assert!(out.contains("Mode[\"A\"] = \"a\""), "{out}");
        assert!(out.contains("new Set()") && out.contains("event.properties[`host_${Mode.A}`]"));
        for gone in [
            "enum ",
            "interface",
            "type M",
            " as string",
            "properties!",
            ": PluginEvent",
        ] {
            assert!(!out.contains(gone), "{gone} left in {out}");
        }
        assert!(out.starts_with(
            "\"use strict\";\nObject.defineProperty(exports, \"__esModule\", { value: true });\n"
        ));
    }

    #[test]
    fn type_only_exports_disappear() {
        let source = "type T = string
export interface Shape {}
export type { T }
export type Alias = T
export declare const d: T
const v = 1
export { v, type T as U }
";
        let out = cjs(source, "index.ts");
        assert!(exports(&out, "v", "v"), "{out}");
        assert_eq!(
            out.matches("Object.defineProperty(exports, ").count(),
            2,
            "{out}"
        );
    }

    #[test]
    fn strips_typescript_without_type_checking() {
        let source = r#"import type { Meta } from 'no-such-module'
import { OnlyAType } from 'also-missing'
declare const injected: number
type Pair = [number, string]
interface Shape<T> { value: T }
abstract class Base<T> implements Shape<T> {
  constructor(public value: T, private readonly label?: string) {}
  abstract describe(): string
}
function first<T>(items: T[]): T | undefined { return items[0] }
const wrong: number = 'not a number' as unknown as number
const pair: Pair = [1, 'a']
const key: Shape<string>['value'] = first<string>(['x'])!
const enum Flags { On = 1 }
let meta: Meta | OnlyAType
module.exports = { wrong, pair, key, on: Flags.On }
"#;
        let out = cjs(source, "plugin.ts");
        for gone in [
            "import",
            "type ",
            "interface",
            "declare",
            "implements",
            "abstract",
            "private",
            " as ",
            "<T>",
            "<string>",
            ": number",
            "Pair",
            "Meta",
            "missing",
        ] {
            assert!(!out.contains(gone), "{gone} left in {out}");
        }
        assert!(out.contains("const wrong = \"not a number\";"), "{out}");
        assert!(out.contains("this.value = value;"), "{out}");
        assert!(out.contains("module.exports = {"), "{out}");
    }

    #[test]
    fn default_imports_use_interop_helper_once() {
        let out = cjs("import a from 'a'\nimport b from 'b'\na(b)\n", "index.js");
        assert!(
            out.contains("const a = __ps_default(require(\"a\"));"),
            "{out}"
        );
        assert!(
            out.contains("const b = __ps_default(require(\"b\"));"),
            "{out}"
        );
        assert_eq!(out.matches("function __ps_default(").count(), 1, "{out}");
        assert!(out.contains("m && m.__esModule ? m.default : m"));
    }

    #[test]
    fn named_namespace_and_side_effect_imports() {
        let source = "import 'polyfill'\nimport * as fs from 'fs'\nimport { a, b as c, default as d, 'x-y' as e } from 'm'\nimport f, { g } from 'n'\nconsole.log(fs, a, c, d, e, f, g)\n";
        let out = cjs(source, "index.mjs");
        assert!(out.contains("require(\"polyfill\");\n"), "{out}");
        assert!(out.contains("const fs = require(\"fs\");"), "{out}");
        assert!(out.contains("const __ps_m0 = require(\"m\");"), "{out}");
        assert!(out.contains("const d = __ps_default(__ps_m0);"), "{out}");
        assert!(
            out.contains("const { a, b: c, \"x-y\": e } = __ps_m0;"),
            "{out}"
        );
        assert!(out.contains("const f = __ps_default(__ps_m1);"), "{out}");
        assert!(out.contains("const { g } = __ps_m1;"), "{out}");
        // Dependencies run before the module body, as in ESM.
        assert!(
            out.find("require(\"n\")") < out.find("console.log"),
            "{out}"
        );
    }

    #[test]
    fn exported_declarations_stay_and_are_exported() {
        let source = "export function f() {}\nexport async function g() {}\nexport class C {}\nexport const a = 1, { b, c: [d, ...e] } = obj\nexport let l\nexport var v = 2\n";
        let out = cjs(source, "index.js");
        for name in ["f", "g", "C", "a", "b", "d", "e", "l", "v"] {
            assert!(exports(&out, name, name), "{name} not exported: {out}");
        }
        assert!(
            out.contains("function f() {}\nasync function g() {}\nclass C {}\n"),
            "{out}"
        );
        assert!(
            out.contains("const a = 1, { b, c: [d, ...e] } = obj;"),
            "{out}"
        );
        assert!(!out.contains("\"c\""), "{out}");
    }

    #[test]
    fn default_exports() {
        let expression = cjs("export default { processEvent(e) { return e } }\n", "a.js");
        assert!(expression.contains("const __ps_default_export = { processEvent(e) {"));
        assert!(exports(&expression, "default", "__ps_default_export"));

        let anonymous = cjs("export default async function () { return 1 }\n", "b.js");
        assert!(
            anonymous.contains("async function __ps_default_export() {"),
            "{anonymous}"
        );
        assert!(exports(&anonymous, "default", "__ps_default_export"));

        let named = cjs("export default function main() {}\n", "c.js");
        assert!(named.contains("function main() {}") && exports(&named, "default", "main"));

        let class = cjs("export default class {}\n", "d.js");
        assert!(
            class.contains("const __ps_default_export = class {};"),
            "{class}"
        );

        let named_class = cjs("export default class Plugin {}\n", "e.js");
        assert!(
            named_class.contains("class Plugin {}") && exports(&named_class, "default", "Plugin")
        );

        let sequence = cjs("export default (1, 2)\n", "f.js");
        assert!(
            sequence.contains("const __ps_default_export = (1, 2);"),
            "{sequence}"
        );

        let listed = cjs("const a = 1\nexport { a as default }\n", "f.js");
        assert!(exports(&listed, "default", "a"), "{listed}");
    }

    #[test]
    fn export_lists_and_reexports() {
        let source = "const a = 1, b = 2\nexport { a, b as c, a as 'd-e' }\nexport { x, y as z, default as w } from './m'\nexport * from './all'\nexport * as ns from './ns'\n";
        let out = cjs(source, "index.js");
        assert!(exports(&out, "a", "a") && exports(&out, "c", "b") && exports(&out, "d-e", "a"));
        assert!(out.contains("const __ps_m0 = require(\"./m\");"), "{out}");
        assert!(
            exports(&out, "x", "__ps_m0.x") && exports(&out, "z", "__ps_m0.y"),
            "{out}"
        );
        assert!(exports(&out, "w", "__ps_default(__ps_m0)"), "{out}");
        assert!(
            out.contains("__ps_reexport(exports, require(\"./all\"));"),
            "{out}"
        );
        assert!(
            out.contains("function __ps_reexport(target, source)"),
            "{out}"
        );
        assert!(
            exports(&out, "ns", "__ps_m1") && out.contains("const __ps_m1 = require(\"./ns\");")
        );
        // Local exports are defined first so that `export *` cannot shadow them.
        assert!(out.find("get: () => a") < out.find("__ps_reexport(exports, require"));
    }

    #[test]
    fn commonjs_passes_through() {
        let sloppy = "#!/usr/bin/env node\nvar plugin = { processEvent: function (e) { with (e) { tag = 010 } return e } }\nmodule.exports = plugin\nexports.extra = require('./extra')\n";
        let out = cjs(sloppy, "index.js");
        assert!(out.contains("module.exports = plugin;\nexports.extra = require(\"./extra\");"));
        assert!(out.contains("with (e)") || out.contains("with(e)"), "{out}");
        assert!(!out.contains("use strict") && !out.contains("__esModule") && !out.contains("#!"));

        let typescript = cjs(
            "const plugin = { processEvent: (e: any) => e }\nmodule.exports = plugin\n",
            "index.ts",
        );
        assert_eq!(
            typescript,
            "const plugin = { processEvent: (e) => e };\nmodule.exports = plugin;\n"
        );

        let esbuild = "var __defProp = Object.defineProperty;\nvar src_exports = {};\n__defProp(src_exports, \"processEvent\", { get: () => processEvent, enumerable: true });\nmodule.exports = src_exports;\nfunction processEvent(e) { return e?.x ?? e; }\n";
        assert!(cjs(esbuild, "dist.js").contains("__defProp(src_exports, \"processEvent\", {"));
    }

    #[test]
    fn type_imports_with_commonjs_exports_in_typescript() {
        let source = "import { PluginEvent } from '@posthog/plugin-scaffold'\nmodule.exports = { processEvent: (e: PluginEvent) => e }\n";
        let out = cjs(source, "index.ts");
        assert!(
            !out.contains("plugin-scaffold") && !out.contains("PluginEvent"),
            "{out}"
        );
        assert!(
            out.contains("module.exports = { processEvent: (e) => e };"),
            "{out}"
        );
    }

    #[test]
    fn modern_syntax_is_not_lowered() {
        let source = "export class Counter {\n  #count = 0n\n  static { this.ready = true }\n  get count() { return this.#count }\n  async *ticks() { for await (const t of source()) yield `tick ${t}` }\n}\nexport const read = async (o) => (await o?.deep?.value) ?? (o.fallback ||= 1) ** 2\n";
        let out = cjs(source, "index.js");
        for kept in [
            "#count = 0n",
            "static {",
            "get count()",
            "async *ticks()",
            "for await",
            "`tick ${t}`",
            "await o?.deep?.value",
            "??",
            "||=",
            "** 2",
        ] {
            assert!(out.contains(kept), "{kept} missing from {out}");
        }
    }

    #[test]
    fn syntax_errors_name_file_line_and_column() {
        let error = transpile(
            "const a = 1\nconst b = 2\nconst c: number = 3 4\n",
            "index.ts",
        )
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "index.ts:3:20: Expected a semicolon or an implicit semicolon after a statement, but found none"
        );
        assert!(matches!(error, TranspileError::Syntax { .. }));

        // Columns count characters, not bytes.
        let error = transpile("const é = 'ü'; const = 1\n", "index.js").unwrap_err();
        assert!(error.to_string().starts_with("index.js:1:22: "), "{error}");

        // TypeScript syntax is not JavaScript.
        assert!(transpile("let a: number = 1\n", "index.js").is_err());
    }

    #[test]
    fn esm_only_constructs_are_rejected() {
        for source in [
            "await fetch('x')\nexport {}\n",
            "export const url = import.meta.url\n",
        ] {
            let error = transpile(source, "index.ts").unwrap_err();
            assert!(
                matches!(error, TranspileError::Unsupported { .. }),
                "{error}"
            );
            assert!(
                error
                    .to_string()
                    .starts_with("index.ts: unsupported in a CommonJS plugin: ")
            );
        }
    }

    #[test]
    fn extension_decides_module_kind() {
        // `.mjs` is ESM even without imports, so it keeps strict mode.
        assert!(cjs("var x = 1\n", "index.mjs").starts_with("\"use strict\";"));
        assert!(cjs("enum E { A }\nexport = E\n", "index.cts").contains("module.exports = E;"));
        assert!(cjs("export const a = 1\n", "index.cjs").contains("__esModule"));
        // Unknown extensions are JavaScript.
        assert!(cjs("module.exports = 1\n", "plugin").contains("module.exports = 1;"));
    }

    #[test]
    fn never_panics_on_garbage() {
        let mut inputs: Vec<String> = [
            "",
            "{",
            "}",
            "export",
            "import",
            "export default",
            "import x from",
            "(((",
            "`${",
            "/*",
            "'",
            "enum",
            "class extends",
            "<T>() =>",
            "\u{0}",
            "\u{feff}\u{2028}",
            "export { a as default, b as default }",
            "let let = let",
            "@dec export class",
            "async function* () { yield* await }",
            "a?.b`c`",
            "#!",
            "x = 08.5n",
            "export default (a, b)",
            "export {}",
            "import {} from 'm'",
            "export * as 'a b' from 'm'",
            "export { 'a b' as 'c d' } from 'm'",
            "export default abstract class {}",
            "export = 1",
            "export as namespace X",
            "import x = require('y'); export default x",
            "declare module 'm' { export const a: number }",
            "export declare function f(): void",
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        // Deterministic pseudo-random soup of JavaScript and TypeScript tokens.
        let tokens = [
            "export", "import", "default", "from", "'m'", "{", "}", "(", ")", "=>", "as", "type",
            "enum", "const", "x", ";", ",", "*", "\n", "<", ">", ":", "?", "!", "=", "async",
            "await", "class", "function",
        ];
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..300 {
            let mut input = String::new();
            for _ in 0..(state % 24) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                input.push_str(tokens[(state % tokens.len() as u64) as usize]);
                input.push(' ');
            }
            inputs.push(input);
        }
        for input in &inputs {
            for file_name in ["fuzz.ts", "fuzz.js"] {
                let _ = transpile(input, file_name);
            }
        }
    }
}
