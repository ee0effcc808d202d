//! The only place hypha touches llama.cpp's C API.
//!
//! Each type owns one llama.cpp object and frees it on drop. The wrappers
//! check every pointer and return code, so the rest of the engine is safe
//! Rust. Threading contract: a [`Model`] is immutable once loaded and may be
//! read (tokenize, metadata, templates) from any thread; a [`Context`],
//! [`Batch`] and [`Sampler`] are used by the engine's single decode thread.

use std::ffi::{c_char, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::OnceLock;

use llama_cpp_sys_2 as sys;

use crate::{ChatMessage, DeviceChoice, Error, GpuLayers, SamplingParams};

pub type Token = sys::llama_token;

/// Loads ggml's dynamic backends and initialises llama.cpp, once per process.
/// Returns the directory the backends were loaded from.
///
/// Backends are loaded from the first folder of `search` that holds any
/// before `llama_backend_init`: that function loads ggml's default folders
/// (the build folder compiled into the library, the executable's folder,
/// the working directory) when nothing is registered yet, which would load
/// every backend a second time from another copy, bypass the search order
/// and dlopen whatever `libggml-*` lies in the working directory.
pub fn init_backends(search: &[PathBuf]) -> Result<PathBuf, Error> {
    static LOADED: OnceLock<Option<PathBuf>> = OnceLock::new();
    let loaded = LOADED.get_or_init(|| {
        // SAFETY: installs a 'static function with a null user pointer;
        // llama.cpp may call it from any thread and it only reads its
        // arguments.
        unsafe { sys::llama_log_set(Some(log_callback), std::ptr::null_mut()) };
        let mut found = None;
        for dir in search {
            if !dir_has_backend(dir) {
                continue;
            }
            // Without the AMX variant unless asked for (see `amx_free`).
            let view = amx_free(dir);
            let from = view.as_ref().map_or(dir.as_path(), |v| v.0.as_path());
            let Some(c_dir) = path_cstring(from) else {
                continue;
            };
            // SAFETY: `c_dir` is NUL-terminated and outlives the call; ggml
            // copies what it needs. `OnceLock` makes this run once, before
            // any model or context is created.
            unsafe { sys::ggml_backend_load_all_from_path(c_dir.as_ptr()) };
            if device_count() > 0 {
                found = Some(dir.clone());
                break;
            }
        }
        if found.is_some() {
            // SAFETY: no arguments; runs once, after the backends above are
            // registered (so it loads none of its own).
            unsafe { sys::llama_backend_init() };
        }
        found
    });
    loaded.clone().ok_or_else(|| Error::NoBackend {
        searched: search
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// True when `dir` holds a backend module (`libggml-cpu-*.so`,
/// `libggml-cuda.so`, ...), not only ggml's core libraries.
fn dir_has_backend(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let module = name
            .strip_prefix("libggml-")
            .or_else(|| name.strip_prefix("ggml-"));
        module.is_some_and(|m| !m.starts_with("base"))
    })
}

/// ggml's CPU variant that uses AMX tile instructions.
const AMX_VARIANT: &str = "libggml-cpu-sapphirerapids.so";

/// A folder of links to the backends in `dir` but the AMX variant, removed
/// when dropped (after loading: the loaded libraries stay mapped).
struct BackendView(PathBuf);

impl Drop for BackendView {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// ggml takes its AMX variant whenever the CPU reports AMX, and in virtual
/// machines that report AMX without keeping tile state across context
/// switches its tile code dies of SIGILL mid-decode. So the variant is left
/// out (the next best, AVX-512, is picked) unless `HYPHA_CPU_AMX=1`: a view
/// of `dir` without it, or `None` when `dir` has none or AMX is wanted.
fn amx_free(dir: &Path) -> Option<BackendView> {
    if std::env::var_os("HYPHA_CPU_AMX").is_some_and(|v| v == "1")
        || !dir.join(AMX_VARIANT).exists()
    {
        return None;
    }
    #[cfg(unix)]
    {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path =
            std::env::temp_dir().join(format!("hypha-backends-{}-{nanos}", std::process::id()));
        // A fresh folder of our own: one that already exists (perhaps
        // someone else's, in a shared temp folder) is never used.
        std::fs::create_dir(&path).ok()?;
        let view = BackendView(path);
        for e in std::fs::read_dir(dir).ok()?.flatten() {
            let name = e.file_name();
            if name != AMX_VARIANT {
                std::os::unix::fs::symlink(e.path(), view.0.join(&name)).ok()?;
            }
        }
        Some(view)
    }
    #[cfg(not(unix))]
    None
}

fn path_cstring(p: &Path) -> Option<CString> {
    CString::new(p.to_str()?).ok()
}

unsafe extern "C" fn log_callback(level: sys::ggml_log_level, text: *const c_char, _: *mut c_void) {
    if text.is_null() {
        return;
    }
    // SAFETY: llama.cpp passes a NUL-terminated string valid for the call.
    let msg = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    let msg = msg.trim_end();
    if msg.is_empty() {
        return;
    }
    match level {
        sys::GGML_LOG_LEVEL_ERROR => tracing::error!(target: "llama", "{msg}"),
        sys::GGML_LOG_LEVEL_WARN => tracing::warn!(target: "llama", "{msg}"),
        sys::GGML_LOG_LEVEL_INFO => tracing::debug!(target: "llama", "{msg}"),
        _ => tracing::trace!(target: "llama", "{msg}"),
    }
}

/// One compute device ggml found.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub name: String,
    pub backend: String,
    pub description: String,
    pub kind: DeviceKind,
    pub memory_free_bytes: u64,
    pub memory_total_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Gpu,
    IntegratedGpu,
    Accelerator,
    Other,
}

fn device_count() -> usize {
    // SAFETY: plain query of ggml's device registry.
    unsafe { sys::ggml_backend_dev_count() }
}

fn cstr_or_empty(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: ggml returns NUL-terminated strings owned by the registry,
    // valid for the life of the process.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn device_at(i: usize) -> (sys::ggml_backend_dev_t, DeviceInfo) {
    // SAFETY: `i < ggml_backend_dev_count()`, checked by the callers.
    let dev = unsafe { sys::ggml_backend_dev_get(i) };
    // SAFETY: `dev` is a registered device; these are read-only queries.
    let (name, description, kind, backend) = unsafe {
        let kind = match sys::ggml_backend_dev_type(dev) {
            sys::GGML_BACKEND_DEVICE_TYPE_CPU => DeviceKind::Cpu,
            sys::GGML_BACKEND_DEVICE_TYPE_GPU => DeviceKind::Gpu,
            sys::GGML_BACKEND_DEVICE_TYPE_IGPU => DeviceKind::IntegratedGpu,
            sys::GGML_BACKEND_DEVICE_TYPE_ACCEL => DeviceKind::Accelerator,
            _ => DeviceKind::Other,
        };
        let reg = sys::ggml_backend_dev_backend_reg(dev);
        let backend = if reg.is_null() {
            String::new()
        } else {
            cstr_or_empty(sys::ggml_backend_reg_name(reg))
        };
        (
            cstr_or_empty(sys::ggml_backend_dev_name(dev)),
            cstr_or_empty(sys::ggml_backend_dev_description(dev)),
            kind,
            backend,
        )
    };
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: both out-pointers are valid for writes.
    unsafe { sys::ggml_backend_dev_memory(dev, &mut free, &mut total) };
    (
        dev,
        DeviceInfo {
            name,
            backend,
            description,
            kind,
            memory_free_bytes: free as u64,
            memory_total_bytes: total as u64,
        },
    )
}

/// Every device ggml has loaded.
pub fn devices() -> Vec<DeviceInfo> {
    (0..device_count()).map(|i| device_at(i).1).collect()
}

fn backend_matches(choice: DeviceChoice, backend: &str) -> bool {
    let b = backend.to_ascii_lowercase();
    match choice {
        DeviceChoice::Cuda => b.starts_with("cuda"),
        DeviceChoice::Metal => b.starts_with("metal") || b.starts_with("mtl"),
        DeviceChoice::Rocm => b.starts_with("rocm") || b.starts_with("hip"),
        DeviceChoice::Vulkan => b.starts_with("vulkan"),
        DeviceChoice::Cpu | DeviceChoice::Auto => false,
    }
}

/// The devices chosen for offloading, and what to call them in logs.
pub struct Placement {
    devices: Vec<sys::ggml_backend_dev_t>,
    pub described: String,
    pub gpu_layers: i32,
}

/// Resolves `--device` and `--gpu-layers` against the loaded backends.
pub fn place(choice: DeviceChoice, layers: GpuLayers) -> Result<Placement, Error> {
    let all: Vec<_> = (0..device_count()).map(device_at).collect();
    let gpu_like = |k: DeviceKind| matches!(k, DeviceKind::Gpu | DeviceKind::IntegratedGpu);
    let picked: Vec<_> = match choice {
        DeviceChoice::Cpu => Vec::new(),
        DeviceChoice::Auto => all.iter().filter(|(_, d)| gpu_like(d.kind)).collect(),
        named => {
            let found: Vec<_> = all
                .iter()
                .filter(|(_, d)| gpu_like(d.kind) && backend_matches(named, &d.backend))
                .collect();
            if found.is_empty() {
                return Err(Error::DeviceUnavailable {
                    wanted: named.as_str().to_owned(),
                    found: all
                        .iter()
                        .map(|(_, d)| format!("{} ({})", d.name, d.backend))
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
            found
        }
    };
    if picked.is_empty() {
        let cpu = all
            .iter()
            .find(|(_, d)| d.kind == DeviceKind::Cpu)
            .map(|(_, d)| d.description.clone())
            .unwrap_or_else(|| "cpu".to_owned());
        return Ok(Placement {
            devices: vec![std::ptr::null_mut()],
            described: format!("CPU ({cpu})"),
            gpu_layers: 0,
        });
    }
    let described = picked
        .iter()
        .map(|(_, d)| format!("{} {} ({})", d.backend, d.name, d.description))
        .collect::<Vec<_>>()
        .join(" + ");
    let mut devices: Vec<_> = picked.iter().map(|(dev, _)| *dev).collect();
    devices.push(std::ptr::null_mut());
    let gpu_layers = match layers {
        GpuLayers::Auto => -1,
        GpuLayers::Count(n) => i32::try_from(n).unwrap_or(i32::MAX),
    };
    Ok(Placement {
        devices,
        described,
        gpu_layers,
    })
}

/// A loaded GGUF model. Immutable after load.
pub struct Model {
    ptr: NonNull<sys::llama_model>,
    vocab: NonNull<sys::llama_vocab>,
}

// SAFETY: llama.cpp's model and vocab are read-only after loading; the
// functions used through `&Model` (tokenize, detokenize, metadata, template
// lookup) do not mutate them and are safe to call concurrently.
unsafe impl Send for Model {}
// SAFETY: see `Send`.
unsafe impl Sync for Model {}

impl Model {
    pub fn load(path: &Path, placement: &mut Placement) -> Result<Self, Error> {
        let c_path = path_cstring(path).ok_or_else(|| Error::ModelLoad {
            path: path.to_path_buf(),
            reason: "path is not valid UTF-8 or contains NUL".into(),
        })?;
        // SAFETY: returns a plain struct by value.
        let mut params = unsafe { sys::llama_model_default_params() };
        params.devices = placement.devices.as_mut_ptr();
        params.n_gpu_layers = placement.gpu_layers;
        // SAFETY: `c_path` is NUL-terminated and lives across the call;
        // `params.devices` points into `placement.devices`, a NULL-terminated
        // list that outlives the call (llama.cpp copies it).
        let raw = unsafe { sys::llama_model_load_from_file(c_path.as_ptr(), params) };
        let ptr = NonNull::new(raw).ok_or_else(|| Error::ModelLoad {
            path: path.to_path_buf(),
            reason: "llama.cpp could not load it (see the log for details)".into(),
        })?;
        // SAFETY: `ptr` is a valid model; the vocab lives as long as it.
        let vocab = unsafe { sys::llama_model_get_vocab(ptr.as_ptr()) };
        let Some(vocab) = NonNull::new(vocab as *mut sys::llama_vocab) else {
            // SAFETY: `ptr` was returned by llama_model_load_from_file.
            unsafe { sys::llama_model_free(ptr.as_ptr()) };
            return Err(Error::ModelLoad {
                path: path.to_path_buf(),
                reason: "model has no vocabulary".into(),
            });
        };
        Ok(Self { ptr, vocab })
    }

    pub fn meta(&self, key: &str) -> Option<String> {
        let key = CString::new(key).ok()?;
        let mut buf = vec![0u8; 256];
        loop {
            // SAFETY: `buf` is writable for `buf.len()` bytes; llama.cpp
            // writes at most that many including the NUL.
            let n = unsafe {
                sys::llama_model_meta_val_str(
                    self.ptr.as_ptr(),
                    key.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if n < 0 {
                return None;
            }
            let n = n as usize;
            if n < buf.len() {
                buf.truncate(n);
                return Some(String::from_utf8_lossy(&buf).into_owned());
            }
            buf.resize(n + 1, 0);
        }
    }

    pub fn n_ctx_train(&self) -> u32 {
        // SAFETY: read-only query on a valid model.
        let n = unsafe { sys::llama_model_n_ctx_train(self.ptr.as_ptr()) };
        u32::try_from(n).unwrap_or(0)
    }

    /// The width of the model's hidden states (an embedding's length).
    pub fn n_embd(&self) -> u32 {
        // SAFETY: read-only query on a valid model.
        let n = unsafe { sys::llama_model_n_embd(self.ptr.as_ptr()) };
        u32::try_from(n).unwrap_or(0)
    }

    pub fn n_params(&self) -> u64 {
        // SAFETY: read-only query on a valid model.
        unsafe { sys::llama_model_n_params(self.ptr.as_ptr()) }
    }

    pub fn size_bytes(&self) -> u64 {
        // SAFETY: read-only query on a valid model.
        unsafe { sys::llama_model_size(self.ptr.as_ptr()) }
    }

    pub fn description(&self) -> String {
        let mut buf = [0u8; 256];
        // SAFETY: `buf` is writable for its length.
        let n =
            unsafe { sys::llama_model_desc(self.ptr.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        let n = usize::try_from(n).unwrap_or(0).min(buf.len());
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    pub fn n_vocab(&self) -> i32 {
        // SAFETY: read-only query on a valid vocab.
        unsafe { sys::llama_vocab_n_tokens(self.vocab.as_ptr()) }
    }

    pub fn chat_template(&self) -> Option<String> {
        // SAFETY: a null name asks for the default template; the returned
        // string is owned by the model.
        let p = unsafe { sys::llama_model_chat_template(self.ptr.as_ptr(), std::ptr::null()) };
        if p.is_null() {
            None
        } else {
            Some(cstr_or_empty(p))
        }
    }

    /// Formats `messages` with `template` (a Jinja source llama.cpp
    /// recognises, or a built-in name such as `chatml`).
    pub fn apply_template(
        &self,
        template: &str,
        messages: &[ChatMessage],
    ) -> Result<String, Error> {
        let tmpl =
            CString::new(template).map_err(|_| Error::Template("template has NUL".into()))?;
        let owned: Vec<(CString, CString)> = messages
            .iter()
            .map(|m| {
                Ok((
                    CString::new(m.role.as_str())
                        .map_err(|_| Error::InvalidRequest("role contains a NUL byte".into()))?,
                    CString::new(m.content.as_str())
                        .map_err(|_| Error::InvalidRequest("content contains a NUL byte".into()))?,
                ))
            })
            .collect::<Result<_, Error>>()?;
        let chat: Vec<sys::llama_chat_message> = owned
            .iter()
            .map(|(r, c)| sys::llama_chat_message {
                role: r.as_ptr(),
                content: c.as_ptr(),
            })
            .collect();
        let total: usize = messages
            .iter()
            .map(|m| m.content.len() + m.role.len())
            .sum();
        let mut buf = vec![0u8; total * 2 + 256];
        for _ in 0..2 {
            let len = i32::try_from(buf.len()).map_err(|_| Error::PromptTooLarge)?;
            // SAFETY: `tmpl` and every string in `chat` are NUL-terminated
            // and outlive the call; `buf` is writable for `len` bytes.
            let n = unsafe {
                sys::llama_chat_apply_template(
                    tmpl.as_ptr(),
                    chat.as_ptr(),
                    chat.len(),
                    true,
                    buf.as_mut_ptr().cast(),
                    len,
                )
            };
            if n < 0 {
                return Err(Error::Template(
                    "llama.cpp does not support this model's chat template".into(),
                ));
            }
            let n = n as usize;
            if n <= buf.len() {
                buf.truncate(n);
                return String::from_utf8(buf)
                    .map_err(|_| Error::Template("template produced invalid UTF-8".into()));
            }
            buf.resize(n, 0);
        }
        Err(Error::Template("template output kept growing".into()))
    }

    pub fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<Token>, Error> {
        let len = i32::try_from(text.len()).map_err(|_| Error::PromptTooLarge)?;
        let mut tokens: Vec<Token> = vec![0; text.len() / 2 + 16];
        for _ in 0..2 {
            let cap = i32::try_from(tokens.len()).map_err(|_| Error::PromptTooLarge)?;
            // SAFETY: `text` is valid for `len` bytes (no NUL needed);
            // `tokens` is writable for `cap` entries.
            let n = unsafe {
                sys::llama_tokenize(
                    self.vocab.as_ptr(),
                    text.as_ptr().cast(),
                    len,
                    tokens.as_mut_ptr(),
                    cap,
                    add_special,
                    true,
                )
            };
            if n == i32::MIN {
                return Err(Error::PromptTooLarge);
            }
            if n >= 0 {
                tokens.truncate(n as usize);
                return Ok(tokens);
            }
            tokens.resize(n.unsigned_abs() as usize, 0);
        }
        Err(Error::PromptTooLarge)
    }

    /// The bytes of one token as it appears in generated text.
    pub fn piece(&self, token: Token, out: &mut Vec<u8>) {
        self.piece_into(token, false, out);
    }

    /// The bytes of `token`, control tokens' own text too when `special`.
    fn piece_into(&self, token: Token, special: bool, out: &mut Vec<u8>) {
        let mut buf = [0u8; 64];
        // SAFETY: `buf` is writable for its length.
        let n = unsafe {
            sys::llama_token_to_piece(
                self.vocab.as_ptr(),
                token,
                buf.as_mut_ptr().cast(),
                buf.len() as i32,
                0,
                special,
            )
        };
        if n >= 0 {
            out.extend_from_slice(&buf[..(n as usize).min(buf.len())]);
            return;
        }
        let mut big = vec![0u8; n.unsigned_abs() as usize];
        // SAFETY: `big` is writable for its length.
        let n = unsafe {
            sys::llama_token_to_piece(
                self.vocab.as_ptr(),
                token,
                big.as_mut_ptr().cast(),
                big.len() as i32,
                0,
                special,
            )
        };
        if n >= 0 {
            out.extend_from_slice(&big[..(n as usize).min(big.len())]);
        }
    }

    /// The longest text any one token stands for, control tokens' own
    /// text included: no token covers more bytes of a prompt.
    pub fn longest_piece(&self) -> usize {
        let mut buf = [0u8; 256];
        let mut longest = 0usize;
        for token in 0..self.n_vocab() {
            // SAFETY: `buf` is writable for its length; a negative answer
            // is the length the piece needs, and nothing is written.
            let n = unsafe {
                sys::llama_token_to_piece(
                    self.vocab.as_ptr(),
                    token,
                    buf.as_mut_ptr().cast(),
                    buf.len() as i32,
                    0,
                    true,
                )
            };
            longest = longest.max(n.unsigned_abs() as usize);
        }
        longest
    }

    /// The text of the end-of-sequence token, as templates write it.
    pub fn eos_text(&self) -> String {
        // SAFETY: read-only query on a valid vocab.
        let eos = unsafe { sys::llama_vocab_eos(self.vocab.as_ptr()) };
        if eos < 0 || eos >= self.n_vocab() {
            return String::new();
        }
        let mut text = Vec::new();
        self.piece_into(eos, true, &mut text);
        String::from_utf8_lossy(&text).into_owned()
    }

    pub fn is_eog(&self, token: Token) -> bool {
        // SAFETY: read-only query on a valid vocab.
        unsafe { sys::llama_vocab_is_eog(self.vocab.as_ptr(), token) }
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from llama_model_load_from_file and every
        // Context borrowing it holds an Arc<Model>, so none outlives it.
        unsafe { sys::llama_model_free(self.ptr.as_ptr()) }
    }
}

/// Parameters for the one decoding context.
pub struct ContextParams {
    pub n_ctx: u32,
    pub n_batch: u32,
    pub n_seq_max: u32,
    pub n_threads: i32,
}

/// A llama.cpp context: the KV cache for every sequence slot.
pub struct Context {
    ptr: NonNull<sys::llama_context>,
    // Keeps the model alive as long as the context.
    _model: std::sync::Arc<Model>,
}

// SAFETY: a context is used from one thread at a time (the engine's decode
// thread, which owns it); moving it between threads is fine.
unsafe impl Send for Context {}

impl Context {
    pub fn new(model: std::sync::Arc<Model>, p: &ContextParams) -> Result<Self, Error> {
        // SAFETY: returns a plain struct by value.
        let mut params = unsafe { sys::llama_context_default_params() };
        params.n_ctx = p.n_ctx;
        params.n_batch = p.n_batch;
        params.n_ubatch = p.n_batch;
        params.n_seq_max = p.n_seq_max;
        params.n_threads = p.n_threads;
        params.n_threads_batch = p.n_threads;
        // Separate KV streams per sequence: each slot attends only to its own
        // cells, which keeps a request's output independent of its neighbours.
        params.kv_unified = false;
        params.no_perf = true;
        // SAFETY: the model pointer is valid and outlives the context (held
        // in `_model`).
        let raw = unsafe { sys::llama_init_from_model(model.ptr.as_ptr(), params) };
        let ptr = NonNull::new(raw).ok_or(Error::ContextCreate)?;
        Ok(Self { ptr, _model: model })
    }

    pub fn n_ctx_seq(&self) -> u32 {
        // SAFETY: read-only query on a valid context.
        unsafe { sys::llama_n_ctx_seq(self.ptr.as_ptr()) }
    }

    pub fn decode(&mut self, batch: &Batch) -> Result<(), i32> {
        // SAFETY: `batch` holds `n_tokens` initialised entries whose
        // sequence ids are below n_seq_max (checked when added).
        let rc = unsafe { sys::llama_decode(self.ptr.as_ptr(), batch.raw) };
        if rc == 0 {
            Ok(())
        } else {
            Err(rc)
        }
    }

    /// Makes `dst` start with the first `n` KV cells of `src`. With separate
    /// KV streams llama.cpp copies the whole stream buffer at the next
    /// decode (a memcpy, far cheaper than recomputing a prompt), then the
    /// cells past `n` are dropped from `dst`. `dst` must be empty.
    pub fn copy_prefix(&mut self, src: i32, dst: i32, n: usize) {
        let n = i32::try_from(n).unwrap_or(i32::MAX);
        // SAFETY: valid context; both ids are below n_seq_max (slot
        // indices) and the whole-sequence copy (p0 = p1 = -1) is the form
        // llama.cpp supports across streams.
        unsafe {
            let mem = sys::llama_get_memory(self.ptr.as_ptr());
            sys::llama_memory_seq_cp(mem, src, dst, -1, -1);
            sys::llama_memory_seq_rm(mem, dst, n, -1);
        }
    }

    /// Keeps the first `n` KV cells of sequence `seq` and forgets the rest.
    pub fn trim_seq(&mut self, seq: i32, n: usize) {
        let n = i32::try_from(n).unwrap_or(i32::MAX);
        // SAFETY: valid context; removing a sequence's tail [n, inf) is
        // supported for attention KV caches.
        unsafe {
            let mem = sys::llama_get_memory(self.ptr.as_ptr());
            sys::llama_memory_seq_rm(mem, seq, n, -1);
        }
    }

    /// Forgets every KV cell of sequence `seq`.
    pub fn clear_seq(&mut self, seq: i32) {
        // SAFETY: valid context; removing a whole sequence never fails.
        unsafe {
            let mem = sys::llama_get_memory(self.ptr.as_ptr());
            sys::llama_memory_seq_rm(mem, seq, -1, -1);
        }
    }
}

/// A context that turns a text's tokens into one pooled embedding: one
/// sequence, the whole input in one micro-batch (pooling needs it), the
/// model's own pooling or, for a model without one (a chat model), the
/// mean of its tokens' states.
pub struct Embedder {
    ctx: Context,
    batch: Batch,
    n_embd: usize,
    n_ctx: usize,
}

impl Embedder {
    pub fn new(model: std::sync::Arc<Model>, n_ctx: u32, n_threads: i32) -> Result<Self, Error> {
        let make = |pooling: sys::llama_pooling_type| -> Result<Context, Error> {
            // SAFETY: returns a plain struct by value.
            let mut params = unsafe { sys::llama_context_default_params() };
            params.n_ctx = n_ctx;
            params.n_batch = n_ctx;
            params.n_ubatch = n_ctx;
            params.n_seq_max = 1;
            params.n_threads = n_threads;
            params.n_threads_batch = n_threads;
            params.embeddings = true;
            params.pooling_type = pooling;
            params.no_perf = true;
            // SAFETY: the model pointer is valid and outlives the context
            // (held in `_model`).
            let raw = unsafe { sys::llama_init_from_model(model.ptr.as_ptr(), params) };
            let ptr = NonNull::new(raw).ok_or(Error::ContextCreate)?;
            Ok(Context {
                ptr,
                _model: model.clone(),
            })
        };
        let mut ctx = make(sys::LLAMA_POOLING_TYPE_UNSPECIFIED)?;
        // SAFETY: read-only query on a valid context.
        if unsafe { sys::llama_pooling_type(ctx.ptr.as_ptr()) } == sys::LLAMA_POOLING_TYPE_NONE {
            ctx = make(sys::LLAMA_POOLING_TYPE_MEAN)?;
        }
        let n_embd = model.n_embd();
        let n_ctx = ctx.n_ctx_seq() as usize;
        Ok(Self {
            ctx,
            batch: Batch::new(n_ctx, 1),
            n_embd: n_embd as usize,
            n_ctx,
        })
    }

    /// The embedding of `tokens`, scaled to unit length.
    pub fn embed(&mut self, tokens: &[Token]) -> Result<Vec<f32>, Error> {
        if tokens.is_empty() {
            return Err(Error::InvalidRequest("an input has no tokens".into()));
        }
        if tokens.len() > self.n_ctx {
            return Err(Error::ContextExceeded {
                prompt_tokens: u32::try_from(tokens.len()).unwrap_or(u32::MAX),
                max_tokens: u32::try_from(self.n_ctx).unwrap_or(u32::MAX),
            });
        }
        self.batch.clear();
        for (i, &t) in tokens.iter().enumerate() {
            self.batch
                .push(t, i32::try_from(i).unwrap_or(i32::MAX), 0, true);
        }
        let decoded = self.ctx.decode(&self.batch);
        let out = decoded.map_err(Error::Decode).and_then(|()| {
            // SAFETY: valid context; sequence 0 was just decoded with
            // pooling on, so the pointer (when not null) holds `n_embd`
            // floats owned by the context until its next decode.
            let p = unsafe { sys::llama_get_embeddings_seq(self.ctx.ptr.as_ptr(), 0) };
            if p.is_null() {
                return Err(Error::Decode(-1));
            }
            // SAFETY: see above; copied out at once.
            Ok(unsafe { std::slice::from_raw_parts(p, self.n_embd) }.to_vec())
        });
        self.ctx.clear_seq(0);
        let mut v = out?;
        let norm = v
            .iter()
            .map(|x| f64::from(*x) * f64::from(*x))
            .sum::<f64>()
            .sqrt();
        if norm > 0.0 && norm.is_finite() {
            for x in &mut v {
                *x = (f64::from(*x) / norm) as f32;
            }
        }
        Ok(v)
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from llama_init_from_model and is freed once.
        unsafe { sys::llama_free(self.ptr.as_ptr()) }
    }
}

/// A reusable token batch, allocated once at the context's batch size.
pub struct Batch {
    raw: sys::llama_batch,
    capacity: usize,
    n_seq_max: i32,
}

// SAFETY: owned heap buffers, used by one thread at a time.
unsafe impl Send for Batch {}

impl Batch {
    pub fn new(capacity: usize, n_seq_max: i32) -> Self {
        let cap = i32::try_from(capacity).unwrap_or(i32::MAX);
        // SAFETY: allocates `cap` entries with one sequence id each.
        let raw = unsafe { sys::llama_batch_init(cap, 0, 1) };
        Self {
            raw,
            capacity,
            n_seq_max,
        }
    }

    pub fn clear(&mut self) {
        self.raw.n_tokens = 0;
    }

    pub fn len(&self) -> usize {
        self.raw.n_tokens as usize
    }

    pub fn is_empty(&self) -> bool {
        self.raw.n_tokens == 0
    }

    pub fn remaining(&self) -> usize {
        self.capacity - self.len()
    }

    /// Adds one token; returns its index in the batch.
    pub fn push(&mut self, token: Token, pos: i32, seq: i32, want_logits: bool) -> i32 {
        let i = self.len();
        assert!(i < self.capacity, "batch overflow");
        assert!(
            (0..self.n_seq_max).contains(&seq),
            "sequence id out of range"
        );
        // SAFETY: `i < capacity`, and llama_batch_init allocated `capacity`
        // entries for every array, with one seq id slot per entry.
        unsafe {
            *self.raw.token.add(i) = token;
            *self.raw.pos.add(i) = pos;
            *self.raw.n_seq_id.add(i) = 1;
            *(*self.raw.seq_id.add(i)) = seq;
            *self.raw.logits.add(i) = i8::from(want_logits);
        }
        self.raw.n_tokens += 1;
        i as i32
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // SAFETY: allocated by llama_batch_init, freed once.
        unsafe { sys::llama_batch_free(self.raw) }
    }
}

/// The GBNF grammar llama.cpp's converter writes for a JSON schema (the
/// schema's JSON text), or why it cannot.
pub fn json_schema_to_grammar(schema_json: &str) -> Result<String, Error> {
    let bad = |m: &str| Error::InvalidRequest(format!("JSON schema: {m}"));
    let schema = CString::new(schema_json).map_err(|_| bad("it holds a NUL byte"))?;
    let mut out: *mut c_char = std::ptr::null_mut();
    // SAFETY: `schema` is a NUL-terminated string alive for the call; `out`
    // receives a malloc'd string (or stays null), which we free below. The
    // wrapper catches C++ exceptions.
    let status = unsafe { sys::llama_rs_json_schema_to_grammar(schema.as_ptr(), true, &mut out) };
    if out.is_null() {
        return Err(bad(if status == sys::LLAMA_RS_STATUS_EXCEPTION {
            "llama.cpp cannot convert it to a grammar"
        } else {
            "conversion failed"
        }));
    }
    // SAFETY: a valid NUL-terminated string written by the wrapper.
    let grammar = unsafe { CStr::from_ptr(out) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: allocated by the wrapper, freed once.
    unsafe { sys::llama_rs_string_free(out) };
    if status != sys::LLAMA_RS_STATUS_OK {
        return Err(bad("conversion failed"));
    }
    Ok(grammar)
}

/// A llama.cpp sampler chain, and the grammar that constrains it, if any.
pub struct Sampler {
    ptr: NonNull<sys::llama_sampler>,
    grammar: Option<NonNull<sys::llama_sampler>>,
    /// Candidates of one step, reused (grammar-constrained sampling only).
    cur: Vec<sys::llama_token_data>,
    /// The chain is greedy with no penalties: the pick within a grammar
    /// is the likeliest token the grammar allows.
    plain_greedy: bool,
    /// Logits and ids of one step, reused (the greedy shortlist).
    ranked: Vec<(f32, Token)>,
}

// SAFETY: owned by one slot on the decode thread.
unsafe impl Send for Sampler {}

impl Sampler {
    /// Penalties look back over this many tokens.
    const PENALTY_LAST_N: i32 = 64;
    /// A greedy pick the grammar rejects is looked for among this many
    /// likeliest tokens first, in order, before the grammar is applied to
    /// the whole vocabulary.
    const GREEDY_SHORTLIST: usize = 512;

    /// A chain for `spec`; with a GBNF `grammar` (root rule `root`) every
    /// token sampled keeps the text within it.
    pub fn new(
        model: &Model,
        spec: &SamplingParams,
        seed: u32,
        grammar: Option<&crate::Grammar>,
    ) -> Result<Self, Error> {
        let n_vocab = model.n_vocab();
        let grammar =
            match grammar {
                None => None,
                Some(g) => {
                    let nul = |_| Error::InvalidRequest("the grammar holds a NUL byte".into());
                    let text = CString::new(g.gbnf.as_str()).map_err(nul)?;
                    let trigger = g
                        .lazy_trigger
                        .as_deref()
                        .map(CString::new)
                        .transpose()
                        .map_err(nul)?;
                    let g = match &trigger {
                        // SAFETY: the vocab outlives the sampler (the slot holds
                        // the model); both strings are NUL-terminated and alive
                        // for the call; the wrapper catches C++ exceptions and
                        // returns null for a grammar that does not parse.
                        None => unsafe {
                            sys::llama_rs_sampler_init_grammar(
                                model.vocab.as_ptr(),
                                text.as_ptr(),
                                c"root".as_ptr(),
                            )
                        },
                        Some(word) => {
                            let words = [word.as_ptr()];
                            // SAFETY: as above; `words` holds one pointer to a
                            // NUL-terminated string alive for the call (the
                            // wrapper copies it, escaped, into a pattern); no
                            // trigger tokens (null, count 0).
                            unsafe {
                                sys::llama_rs_sampler_init_grammar_lazy(
                                    model.vocab.as_ptr(),
                                    text.as_ptr(),
                                    c"root".as_ptr(),
                                    words.as_ptr().cast_mut(),
                                    words.len(),
                                    std::ptr::null(),
                                    0,
                                )
                            }
                        }
                    };
                    Some(NonNull::new(g).ok_or_else(|| {
                        Error::InvalidRequest("the grammar does not parse".into())
                    })?)
                }
            };
        // SAFETY: plain struct by value.
        let mut params = unsafe { sys::llama_sampler_chain_default_params() };
        params.no_perf = true;
        // SAFETY: creates an empty chain we own.
        let chain = unsafe { sys::llama_sampler_chain_init(params) };
        let ptr = match NonNull::new(chain) {
            Some(p) => p,
            None => {
                if let Some(g) = grammar {
                    // SAFETY: created above, owned by nobody else.
                    unsafe { sys::llama_sampler_free(g.as_ptr()) };
                }
                return Err(Error::Sampler);
            }
        };
        let penalised = spec.repeat_penalty != 1.0
            || spec.frequency_penalty != 0.0
            || spec.presence_penalty != 0.0;
        let s = Self {
            ptr,
            grammar,
            cur: Vec::new(),
            plain_greedy: spec.temperature <= 0.0 && !penalised,
            ranked: Vec::new(),
        };
        // SAFETY (each add below): the chain takes ownership of a freshly
        // created sampler; creation functions never return null for valid
        // arguments, and we check anyway.
        unsafe {
            if penalised {
                s.add(sys::llama_sampler_init_penalties(
                    n_vocab,
                    Self::PENALTY_LAST_N,
                    spec.repeat_penalty,
                    spec.frequency_penalty,
                    spec.presence_penalty,
                ))?;
            }
            if spec.temperature <= 0.0 {
                s.add(sys::llama_sampler_init_greedy())?;
            } else {
                if spec.top_k > 0 {
                    s.add(sys::llama_sampler_init_top_k(spec.top_k))?;
                }
                if spec.top_p < 1.0 {
                    s.add(sys::llama_sampler_init_top_p(spec.top_p, 1))?;
                }
                if spec.min_p > 0.0 {
                    s.add(sys::llama_sampler_init_min_p(spec.min_p, 1))?;
                }
                s.add(sys::llama_sampler_init_temp(spec.temperature))?;
                s.add(sys::llama_sampler_init_dist(seed))?;
            }
        }
        Ok(s)
    }

    unsafe fn add(&self, smpl: *mut sys::llama_sampler) -> Result<(), Error> {
        if smpl.is_null() {
            return Err(Error::Sampler);
        }
        // SAFETY: both pointers are valid; the chain now owns `smpl`.
        unsafe { sys::llama_sampler_chain_add(self.ptr.as_ptr(), smpl) };
        Ok(())
    }

    /// The log-probability of `tok` among the logits at batch index `idx`,
    /// and the `top` likeliest tokens with theirs (most likely first).
    pub fn logprobs(
        ctx: &Context,
        idx: i32,
        n_vocab: i32,
        tok: Token,
        top: usize,
    ) -> Option<(f32, Vec<(Token, f32)>)> {
        // SAFETY: as in `sample`: a row of `n_vocab` floats, valid until
        // the next decode, which cannot run while `ctx` is borrowed.
        let logits = unsafe {
            let p = sys::llama_get_logits_ith(ctx.ptr.as_ptr(), idx);
            if p.is_null() || n_vocab <= 0 {
                return None;
            }
            std::slice::from_raw_parts(p, n_vocab as usize)
        };
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
        let lse = max + sum.ln();
        // The `top` largest, kept sorted, largest first.
        let mut best: Vec<(Token, f32)> = Vec::with_capacity(top + 1);
        for (i, &l) in logits.iter().enumerate() {
            if best.len() == top && best.last().is_none_or(|&(_, b)| l <= b) {
                continue;
            }
            let at = best.partition_point(|&(_, b)| b >= l);
            best.insert(at, (i as Token, l));
            best.truncate(top);
        }
        let lp = logits.get(usize::try_from(tok).ok()?)? - lse;
        Some((lp, best.into_iter().map(|(t, l)| (t, l - lse)).collect()))
    }

    /// Samples from the logits at batch index `idx` and accepts the token.
    ///
    /// With a grammar, as llama.cpp's own server does: the chain picks a
    /// token from all candidates, and only when the grammar rejects it are
    /// the candidates constrained by the grammar (a pass over the whole
    /// vocabulary) and the pick made again.
    pub fn sample(&mut self, ctx: &mut Context, idx: i32, n_vocab: i32) -> Token {
        let Some(grammar) = self.grammar else {
            // SAFETY: `idx` is the batch index of a token decoded with
            // logits requested in the last successful `decode` on `ctx`.
            return unsafe { sys::llama_sampler_sample(self.ptr.as_ptr(), ctx.ptr.as_ptr(), idx) };
        };
        // SAFETY: as above; the logits row holds `n_vocab` floats, valid
        // until the next decode on `ctx`, which cannot happen during this
        // call (`ctx` is borrowed mutably).
        let logits = unsafe {
            let p = sys::llama_get_logits_ith(ctx.ptr.as_ptr(), idx);
            if p.is_null() || n_vocab <= 0 {
                // Not a row with logits: what the unconstrained chain does.
                return sys::llama_sampler_sample(self.ptr.as_ptr(), ctx.ptr.as_ptr(), idx);
            }
            std::slice::from_raw_parts(p, n_vocab as usize)
        };
        let mut tok = self.pick(logits, None);
        if !self.allows(grammar, tok) {
            tok = match self.greedy_within(logits, grammar) {
                Some(t) => t,
                None => self.pick(logits, Some(grammar)),
            };
        }
        // SAFETY: `tok` passed the grammar, so accepting it cannot fail;
        // the wrapper catches C++ exceptions all the same.
        unsafe {
            sys::llama_rs_sampler_accept(grammar.as_ptr(), tok);
            sys::llama_sampler_accept(self.ptr.as_ptr(), tok);
        }
        tok
    }

    /// The chain's pick among all of `logits`, constrained by `grammar`
    /// first when given.
    fn pick(&mut self, logits: &[f32], grammar: Option<NonNull<sys::llama_sampler>>) -> Token {
        self.cur.clear();
        self.cur.extend(
            logits
                .iter()
                .enumerate()
                .map(|(id, &logit)| sys::llama_token_data {
                    id: id as Token,
                    logit,
                    p: 0.0,
                }),
        );
        let mut arr = sys::llama_token_data_array {
            data: self.cur.as_mut_ptr(),
            size: self.cur.len(),
            selected: -1,
            sorted: false,
        };
        // SAFETY: `arr` points into `self.cur`, alive and unaliased for the
        // calls; the samplers are valid.
        unsafe {
            if let Some(g) = grammar {
                sys::llama_sampler_apply(g.as_ptr(), &mut arr);
            }
            sys::llama_sampler_apply(self.ptr.as_ptr(), &mut arr);
        }
        let at = usize::try_from(arr.selected).unwrap_or(0);
        // SAFETY: the chain ends in a selecting sampler (greedy or dist),
        // which sets `selected` within `size`; `data` may have been
        // replaced by a sampler with its own buffer of `size` entries.
        unsafe { (*arr.data.add(at.min(arr.size.saturating_sub(1)))).id }
    }

    /// For a plain greedy chain, the likeliest token `grammar` allows
    /// when it is among the [`Self::GREEDY_SHORTLIST`] likeliest: the pick
    /// the grammar's pass over the whole vocabulary would make (greedy
    /// takes the largest logit, the lowest id among equals), found by
    /// checking a few tokens instead of all. `None` when the chain is not
    /// plain greedy or no shortlisted token is allowed.
    fn greedy_within(
        &mut self,
        logits: &[f32],
        grammar: NonNull<sys::llama_sampler>,
    ) -> Option<Token> {
        if !self.plain_greedy {
            return None;
        }
        // Largest logit first, then lowest id.
        let order = |a: &(f32, Token), b: &(f32, Token)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        let mut all = std::mem::take(&mut self.ranked);
        all.clear();
        all.extend(logits.iter().enumerate().map(|(id, &l)| (l, id as Token)));
        let n = Self::GREEDY_SHORTLIST.min(all.len());
        if n > 0 && n < all.len() {
            all.select_nth_unstable_by(n - 1, order);
        }
        let short = &mut all[..n];
        short.sort_unstable_by(order);
        let found = short
            .iter()
            .map(|&(_, t)| t)
            .find(|&t| self.allows(grammar, t));
        self.ranked = all;
        found
    }

    /// True when `grammar` allows `tok` next.
    fn allows(&self, grammar: NonNull<sys::llama_sampler>, tok: Token) -> bool {
        let mut one = [sys::llama_token_data {
            id: tok,
            logit: 1.0,
            p: 0.0,
        }];
        let mut arr = sys::llama_token_data_array {
            data: one.as_mut_ptr(),
            size: 1,
            selected: -1,
            sorted: false,
        };
        // SAFETY: `arr` points at `one`, alive for the call.
        unsafe { sys::llama_sampler_apply(grammar.as_ptr(), &mut arr) };
        one[0].logit.is_finite()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        // SAFETY: the chain frees its members; the grammar is ours alone;
        // each freed once.
        unsafe {
            sys::llama_sampler_free(self.ptr.as_ptr());
            if let Some(g) = self.grammar {
                sys::llama_sampler_free(g.as_ptr());
            }
        }
    }
}
