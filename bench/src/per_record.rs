//! The per-record Wasm runner: the workload as a component called once per row (see
//! `bench/wit/record.wit`), with the same Parquet reader and writer settings as the native
//! runner and the same wasmtime configuration as weir. Rows cross the boundary as a
//! `list<value>`; the HMAC of W1 is a host call per row.

use std::fs::File;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use arrow_array::builder::{
    ArrayBuilder, BooleanBuilder, Float64Builder, Int32Builder, Int64Builder, StringBuilder,
    TimestampMicrosecondBuilder,
};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int32Type, Int64Type};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, SchemaRef, TimeUnit};
use hmac::{Hmac, Mac};
use parquet::arrow::ArrowWriter;
use sha2::Sha256;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

wasmtime::component::bindgen!({
    path: "wit/record.wit",
    world: "record-plugin",
});

use exports::weir_bench::per_record::row_transform::Value;

struct Host {
    wasi: WasiCtx,
    table: ResourceTable,
    mac: Hmac<Sha256>,
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl weir_bench::per_record::host::Host for Host {
    fn hmac_hex(&mut self, value: String) -> String {
        let mut mac = self.mac.clone();
        mac.update(value.as_bytes());
        let digest = mac.finalize().into_bytes();
        let mut out = String::with_capacity(64);
        for b in digest {
            out.push(char::from(b"0123456789abcdef"[(b >> 4) as usize]));
            out.push(char::from(b"0123456789abcdef"[(b & 15) as usize]));
        }
        out
    }
}

pub fn run(workload: &str, plugin: &Path, input: &Path, output: &Path, key: &[u8]) -> Result<()> {
    let (columns, schema): (Option<&[&str]>, SchemaRef) = match workload {
        "W1" => (None, crate::events_schema()),
        "W2" => (Some(&crate::W2_COLUMNS), crate::w2_schema()),
        other => bail!("the per-record runner does {other}? only W1 and W2"),
    };
    // weir's engine settings: component model, Cranelift at speed, epoch checks compiled in
    let mut config = Config::new();
    config.epoch_interruption(true);
    config.wasm_component_model(true);
    config.cranelift_opt_level(wasmtime::OptLevel::Speed);
    let engine = Engine::new(&config).map_err(|e| anyhow!("{e}"))?;
    let component = Component::from_file(&engine, plugin).map_err(|e| anyhow!("{}: {e}", plugin.display()))?;
    let mut linker = Linker::new(&engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| anyhow!("{e}"))?;
    weir_bench::per_record::host::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s).map_err(|e| anyhow!("{e}"))?;
    let host = Host {
        wasi: WasiCtxBuilder::new().build(),
        table: ResourceTable::new(),
        mac: Hmac::<Sha256>::new_from_slice(key).map_err(|e| anyhow!("{e}"))?,
    };
    let mut store = Store::new(&engine, host);
    store.set_epoch_deadline(u64::MAX);
    let plugin = RecordPlugin::instantiate(&mut store, &component, &linker).map_err(|e| anyhow!("{e}"))?;
    let rt = plugin.weir_bench_per_record_row_transform();
    rt.call_init(&mut store, workload).map_err(|e| anyhow!("{e}"))?.map_err(|e| anyhow!("init: {e}"))?;

    let mut writer = ArrowWriter::try_new(File::create(output)?, schema.clone(), Some(crate::props()))?;
    let mut row = Vec::new();
    for batch in crate::read_columns(input, columns)? {
        let batch = batch?;
        let mut builders: Vec<Box<dyn ArrayBuilder>> = schema
            .fields()
            .iter()
            .map(|f| arrow_array::builder::make_builder(f.data_type(), batch.num_rows()))
            .collect();
        for r in 0..batch.num_rows() {
            row.clear();
            for c in batch.columns() {
                row.push(value_at(c, r)?);
            }
            let out =
                rt.call_process(&mut store, &row).map_err(|e| anyhow!("{e}"))?.map_err(|e| anyhow!("row {r}: {e}"))?;
            if let Some(out) = out {
                if out.len() != builders.len() {
                    bail!("the plugin returned {} values for {} columns", out.len(), builders.len());
                }
                for (b, v) in builders.iter_mut().zip(out) {
                    append(b.as_mut(), v)?;
                }
            }
        }
        let cols: Vec<ArrayRef> = builders.iter_mut().map(|b| b.finish()).collect();
        let out = RecordBatch::try_new(schema.clone(), cols)?;
        if out.num_rows() > 0 {
            writer.write(&out)?;
        }
    }
    writer.close()?;
    Ok(())
}

fn value_at(c: &ArrayRef, r: usize) -> Result<Value> {
    if c.is_null(r) {
        return Ok(Value::Null);
    }
    Ok(match c.data_type() {
        DataType::Int64 => Value::Int(c.as_primitive::<Int64Type>().value(r)),
        DataType::Int32 => Value::Int(c.as_primitive::<Int32Type>().value(r) as i64),
        DataType::Float64 => Value::Float(c.as_primitive::<Float64Type>().value(r)),
        DataType::Utf8 => Value::Text(c.as_string::<i32>().value(r).to_string()),
        DataType::Boolean => Value::Boolean(c.as_boolean().value(r)),
        other => bail!("no per-record value for {other}"),
    })
}

fn append(b: &mut dyn ArrayBuilder, v: Value) -> Result<()> {
    let any = b.as_any_mut();
    macro_rules! put {
        ($ty:ty, $some:pat => $val:expr) => {
            if let Some(b) = any.downcast_mut::<$ty>() {
                match v {
                    Value::Null => b.append_null(),
                    $some => b.append_value($val),
                    other => bail!("value {other:?} does not fit a {}", stringify!($ty)),
                }
                return Ok(());
            }
        };
    }
    put!(Int64Builder, Value::Int(x) => x);
    put!(Int32Builder, Value::Int(x) => i32::try_from(x).context("int32 out of range")?);
    put!(Float64Builder, Value::Float(x) => x);
    put!(StringBuilder, Value::Text(x) => x);
    put!(BooleanBuilder, Value::Boolean(x) => x);
    put!(TimestampMicrosecondBuilder, Value::Int(x) => x);
    let _ = TimeUnit::Microsecond;
    bail!("no builder for this column")
}
