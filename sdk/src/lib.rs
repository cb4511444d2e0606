//! `weir-sdk`: everything a weir plugin author depends on.
//!
//! A weir transform is a WebAssembly component that receives Arrow record batches and returns
//! Arrow record batches. This crate hides the component model: you write a typed config, a
//! constructor that checks it against the input schema and declares the output schema, and a
//! `process` function from `RecordBatch` to `RecordBatch`. One macro exports it.
//!
//! ```
//! use std::sync::Arc;
//! use weir_sdk::prelude::*;
//!
//! #[derive(Deserialize)]
//! #[serde(crate = "weir_sdk::serde", deny_unknown_fields)]
//! struct Config { column: String }
//!
//! /// Upper-cases one string column.
//! struct Upper { index: usize, schema: SchemaRef }
//!
//! impl Transform for Upper {
//!     type Config = Config;
//!     fn new(config: Config, input: &SchemaRef, _ctx: &Context) -> Result<Self> {
//!         let index = require_column(input, &config.column, &[DataType::Utf8])?;
//!         Ok(Upper { index, schema: input.clone() })
//!     }
//!     fn output_schema(&self) -> SchemaRef { self.schema.clone() }
//!     fn process(&mut self, batch: RecordBatch) -> Result<RecordBatch> {
//!         let col = batch.column(self.index).as_string::<i32>();
//!         let upper: StringArray = col.iter().map(|v| v.map(str::to_uppercase)).collect();
//!         replace_column(&batch, self.index, Arc::new(upper))
//!     }
//! }
//!
//! weir_sdk::export_transform!(Upper);
//! # fn main() {}
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2` (crate type `cdylib`): the
//! `.wasm` file in `target/wasm32-wasip2/release/` is the component to name in a pipeline.
//!
//! The same type runs natively in an ordinary `cargo test` through [`testing::Harness`],
//! host imports included (logging, counters, keyed hashing).
//!
//! Stateful plugins (dedup, aggregate) keep state in `self` and emit what is left in
//! [`Transform::finish`]. Plugins that want to handle the Arrow IPC bytes themselves
//! implement [`RawTransform`] and export it with [`export_raw_transform!`].

extern crate self as weir_sdk;

pub mod error;
pub mod extract;
pub mod host;
pub mod intset;
pub mod ipc;
pub mod keyed;
pub mod keys;
pub mod rewrite;
pub mod row_filter;
pub mod rule;
pub mod runner;
pub mod state;
pub mod temporal;
pub mod util;

#[cfg(not(target_arch = "wasm32"))]
pub mod config;
#[cfg(not(target_arch = "wasm32"))]
pub mod hashing;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

pub use arrow_array;
pub use arrow_buffer;
pub use arrow_cast;
pub use arrow_schema;
pub use arrow_select;
pub use serde;
/// For configs with untyped values (`serde_json::Value`).
pub use serde_json;

pub use error::{Error, Result};
pub use runner::{RawTransform, Typed};

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;

/// The version of the WIT contract (`weir:plugin@...`) this SDK builds plugins against.
pub const CONTRACT_VERSION: &str = "0.2.2";

/// Where a plugin instance runs: handed to [`Transform::new`] once per instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context {
    /// Pipeline name.
    pub pipeline: String,
    /// Step name.
    pub step: String,
    /// The plugin's name in the pipeline file.
    pub plugin: String,
    /// The run's partition, if the run has one.
    pub partition: Option<String>,
}

/// A transform plugin: typed config in, batches in and out.
pub trait Transform: Sized + 'static {
    /// The plugin's `config` table from the pipeline file. Use
    /// `#[serde(deny_unknown_fields)]` so typos are errors; the SDK reports the field path.
    type Config: serde::de::DeserializeOwned;

    /// Check `config` against the input schema and build the instance. Return
    /// [`Error::InvalidConfig`] for anything the user must fix in the pipeline file.
    fn new(config: Self::Config, input: &SchemaRef, ctx: &Context) -> Result<Self>;

    /// The schema of every batch this instance returns. The host checks each batch against it.
    fn output_schema(&self) -> SchemaRef;

    /// Transform one batch. Return an empty batch to emit nothing.
    fn process(&mut self, batch: RecordBatch) -> Result<RecordBatch>;

    /// The columns this instance rewrites in place, when that is all it does: it replaces
    /// those columns row for row (its output schema is the input schema with only their
    /// fields changed) and keeps no rows back for `finish`. Then `process` receives batches
    /// of only these columns, in input order, and returns them as `output_schema` types
    /// them; the host puts the other columns back without sending them through the
    /// sandbox (see [`rewrite`]). The default, `None`: whole batches in and out.
    fn rewrites(&self) -> Option<Vec<String>> {
        None
    }

    /// The columns this instance's row filter reads, when all it does is keep or drop rows:
    /// its output schema is its input schema, it keeps no rows back for `finish`, and whether
    /// it keeps a row depends on these columns only. The host then calls [`Transform::keep`]
    /// (not `process`) with batches of only these columns, in input order, and drops the
    /// rows itself; the other columns never cross the sandbox boundary (see [`row_filter`]).
    /// The default, `None`: whole batches in and out.
    fn filter_columns(&self) -> Option<Vec<String>> {
        None
    }

    /// Under [`Transform::filter_columns`]: one value per row of `batch` (those columns
    /// only): true keeps the row, false or null drops it.
    fn keep(&mut self, _batch: &RecordBatch) -> Result<arrow_array::BooleanArray> {
        Err(Error::internal("the plugin declares filter columns but does not implement `keep`"))
    }

    /// End of input: emit what is left. Stateless transforms keep the default.
    fn finish(&mut self) -> Result<Option<RecordBatch>> {
        Ok(None)
    }

    /// Checkpoint: the state kept across batches, or `None` when there is none (the
    /// default). A plugin that keeps state (it implements `finish`) must implement this and
    /// [`Transform::restore`], or a resumed run would lose what it had seen.
    /// [`state::Writer`] helps encode it.
    fn snapshot(&mut self) -> Result<Option<Vec<u8>>> {
        Ok(None)
    }

    /// Resume: restore what [`Transform::snapshot`] returned. Called after `new`, before any
    /// batch.
    fn restore(&mut self, _state: &[u8]) -> Result<()> {
        Err(Error::internal("this plugin keeps no state, so it has none to restore"))
    }
}

/// What most plugins need in one `use`.
pub mod prelude {
    pub use crate::error::{Error, Result};
    pub use crate::host::{self, HashAlgorithm, Level};
    pub use crate::util::{replace_column, require_column};
    pub use crate::{Context, Transform};
    pub use arrow_array::cast::AsArray;
    pub use arrow_array::{Array, ArrayRef, RecordBatch, StringArray};
    pub use arrow_schema::{DataType, Field, Schema, SchemaRef};
    pub use serde::Deserialize;
}

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

/// Generated component bindings. Not part of the public API: use the export macros.
#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod __bindings {
    wit_bindgen::generate!({
        world: "transform-plugin",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "__export_transform_world",
        default_bindings_module: "::weir_sdk::__bindings",
        runtime_path: "::weir_sdk::__wit_bindgen::rt",
    });
}

/// Generated bindings of the quality-rule world (sharing the host and types interfaces).
#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod __rule_bindings {
    wit_bindgen::generate!({
        world: "quality-rule-plugin",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "__export_quality_rule_world",
        default_bindings_module: "::weir_sdk::__rule_bindings",
        runtime_path: "::weir_sdk::__wit_bindgen::rt",
        with: {
            "weir:plugin/host@0.2.2": crate::__bindings::weir::plugin::host,
            "weir:plugin/types@0.2.2": crate::__bindings::weir::plugin::types,
        },
    });
}

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod __extractor_bindings {
    wit_bindgen::generate!({
        world: "extractor-plugin",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "__export_extractor_world",
        default_bindings_module: "::weir_sdk::__extractor_bindings",
        runtime_path: "::weir_sdk::__wit_bindgen::rt",
        with: {
            "weir:plugin/host@0.2.2": crate::__bindings::weir::plugin::host,
            "weir:plugin/types@0.2.2": crate::__bindings::weir::plugin::types,
        },
    });
}

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod __extractor_glue;

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod __glue;

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod __rule_glue;

/// Export a [`Transform`] as the plugin's component. Use once per plugin crate.
///
/// On targets other than `wasm32` it expands to nothing, so the same crate also builds for
/// native unit tests with [`testing::Harness`].
#[macro_export]
macro_rules! export_transform {
    ($t:ty) => {
        $crate::export_raw_transform!($crate::Typed<$t>);
    };
}

/// Export a [`rule::QualityRule`] as the plugin's component (a custom quality check).
#[macro_export]
macro_rules! export_quality_rule {
    ($t:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            use $crate::__bindings::weir::plugin::types as __ty;
            use $crate::__rule_bindings::exports::weir::plugin::quality_rule as __wq;
            struct __WeirRuleExport;
            impl __wq::Guest for __WeirRuleExport {
                fn init(
                    config: ::std::string::String,
                    input_schema: ::std::vec::Vec<u8>,
                    ctx: __ty::Context,
                ) -> ::std::result::Result<(), __ty::PluginError> {
                    $crate::__rule_glue::init::<$t>(config, input_schema, ctx)
                }
                fn check(batch: ::std::vec::Vec<u8>) -> ::std::result::Result<__wq::BatchVerdict, __ty::PluginError> {
                    $crate::__rule_glue::check(batch)
                }
                fn finish() -> ::std::result::Result<__wq::Verdict, __ty::PluginError> {
                    $crate::__rule_glue::finish()
                }
            }
            $crate::__rule_bindings::__export_quality_rule_world!(__WeirRuleExport with_types_in $crate::__rule_bindings);
        };
    };
}

/// Export an [`extract::Extractor`] as the plugin's component (a source the host runs).
#[macro_export]
macro_rules! export_extractor {
    ($t:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            use $crate::__bindings::weir::plugin::types as __ty;
            use $crate::__extractor_bindings::exports::weir::plugin::extractor as __wx;
            struct __WeirExtractorExport;
            impl __wx::Guest for __WeirExtractorExport {
                fn open(
                    config: ::std::string::String,
                    ctx: __ty::Context,
                    position: ::std::option::Option<::std::vec::Vec<u8>>,
                    watermark: ::std::option::Option<::std::string::String>,
                ) -> ::std::result::Result<::std::vec::Vec<u8>, __ty::PluginError> {
                    $crate::__extractor_glue::open::<$t>(config, ctx, position, watermark)
                }
                fn next() -> ::std::result::Result<::std::option::Option<__wx::Extracted>, __ty::PluginError> {
                    $crate::__extractor_glue::next()
                }
            }
            $crate::__extractor_bindings::__export_extractor_world!(__WeirExtractorExport with_types_in $crate::__extractor_bindings);
        };
    };
}

/// Export a [`RawTransform`] (bytes in, bytes out) as the plugin's component.
#[macro_export]
macro_rules! export_raw_transform {
    ($t:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            use $crate::__bindings::exports::weir::plugin::transform as __wt;
            use $crate::__bindings::weir::plugin::types as __ty;
            struct __WeirExport;
            impl __wt::Guest for __WeirExport {
                fn init(
                    config: ::std::string::String,
                    input_schema: ::std::vec::Vec<u8>,
                    ctx: __ty::Context,
                ) -> ::std::result::Result<::std::vec::Vec<u8>, __ty::PluginError> {
                    $crate::__glue::init::<$t>(config, input_schema, ctx)
                }
                fn process(
                    batch: ::std::vec::Vec<u8>,
                ) -> ::std::result::Result<::std::vec::Vec<u8>, __ty::PluginError> {
                    $crate::__glue::process(batch)
                }
                fn finish() -> ::std::result::Result<::std::vec::Vec<u8>, __ty::PluginError> {
                    $crate::__glue::finish()
                }
                fn snapshot() -> ::std::result::Result<::std::option::Option<::std::vec::Vec<u8>>, __ty::PluginError> {
                    $crate::__glue::snapshot()
                }
                fn restore(state: ::std::vec::Vec<u8>) -> ::std::result::Result<(), __ty::PluginError> {
                    $crate::__glue::restore(state)
                }
            }
    $crate::__bindings::__export_transform_world!(__WeirExport with_types_in $crate::__bindings);
        };
    };
}
