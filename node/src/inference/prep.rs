//! Templating and tokenizing a prompt, off the async workers.
//!
//! Turning a prompt into tokens costs time in proportion to its size (a
//! 4 MiB prompt takes a core for a good fraction of a second), so it never
//! runs on a tokio worker, where it would stall every connection, `/health`
//! included. First two cheap checks: a prompt with more bytes than a slot's
//! context can hold whatever its tokens ([`Engine::check_prompt_bytes`]) is
//! refused, and so is any prompt while the engine's queue is full. Then the
//! work runs on tokio's blocking pool, at most [`MAX_PREPARING`] jobs at
//! once node-wide and [`PER_PEER_PREPARING`] per peer: a peer's requests
//! wait behind its own, and the node-wide permits are handed out in order
//! of arrival, so one peer flooding cannot starve another.

use std::sync::{Arc, Mutex};

use hypha_engine::{ChatMessage, Engine, Error, Token};
use hypha_wire::NodeId;
use tokio::sync::Semaphore;

use crate::inference::template;
use crate::inference::tools::{generic_messages, ToolChat, ToolFormat};
use crate::net::pool::{MAX_CONNECTIONS, MAX_PEERS};
use crate::util::{lock, BoundedMap, Overflow};

/// Prompts templated and tokenized at once, node-wide: about the cores a
/// small machine can spare beside its decode threads and network tasks.
pub const MAX_PREPARING: usize = 2;
/// Prompts of one peer prepared at once: the rest of its requests wait for
/// it in turn, never ahead of other peers.
pub const PER_PEER_PREPARING: usize = 1;
/// Peers tracked at once: room for every peer connected to this node and
/// every one it dialed (a peer may send requests either way); an entry
/// nobody waits on is dropped to make room.
const MAX_PREP_PEERS: usize = MAX_PEERS + MAX_CONNECTIONS;

const _: () = assert!(PER_PEER_PREPARING <= MAX_PREPARING);

/// What is to become tokens.
pub enum Input {
    Chat(Vec<ChatMessage>),
    /// A chat with tools offered or calls in its history, and how the
    /// engine's model writes calls.
    Tools(ToolChat, ToolFormat),
    Text(String),
}

impl Input {
    fn bytes(&self) -> usize {
        match self {
            Self::Chat(m) => m.iter().map(|m| m.role.len() + m.content.len()).sum(),
            Self::Tools(c, _) => c.bytes(),
            Self::Text(t) => t.len(),
        }
    }
}

/// The prompt text of a chat with tools: the model's own template with
/// the tools in it, or (the generic format) the tools described in the
/// system message and llama.cpp's template code.
fn render_tools(engine: &Engine, chat: &ToolChat, format: ToolFormat) -> Result<String, Error> {
    let info = engine.info();
    match (format, info.chat_template.as_deref()) {
        (ToolFormat::Generic, _) | (_, None) => engine.apply_chat_template(&generic_messages(chat)),
        (_, Some(t)) => template::render(t, &info.eos_token, chat).map_err(Error::InvalidRequest),
    }
}

/// See the module docs.
pub struct Preparer {
    global: Arc<Semaphore>,
    peers: Mutex<BoundedMap<NodeId, Arc<Semaphore>>>,
}

impl Default for Preparer {
    fn default() -> Self {
        Self {
            global: Arc::new(Semaphore::new(MAX_PREPARING)),
            peers: Mutex::new(BoundedMap::new(MAX_PREP_PEERS, Overflow::Refuse)),
        }
    }
}

impl Preparer {
    /// `input` as `engine`'s tokens, for `peer` (or a client of this
    /// node's own API).
    pub async fn tokens(
        &self,
        engine: &Engine,
        peer: Option<NodeId>,
        input: Input,
    ) -> Result<Vec<Token>, Error> {
        let empty = match &input {
            Input::Chat(m) => m.is_empty(),
            Input::Tools(c, _) => c.messages.is_empty(),
            Input::Text(_) => false,
        };
        if empty {
            return Err(Error::InvalidRequest("messages must not be empty".into()));
        }
        engine.check_prompt_bytes(input.bytes())?;
        engine.check_queue()?;
        let _own = match peer {
            Some(id) => {
                let sem = lock(&self.peers)
                    .get_or_insert_with(
                        id,
                        |s| Arc::strong_count(s) == 1,
                        || Arc::new(Semaphore::new(PER_PEER_PREPARING)),
                    )
                    .cloned()
                    .ok_or(Error::QueueFull { queued: 0 })?;
                Some(sem.acquire_owned().await.map_err(|_| Error::Stopped)?)
            }
            None => None,
        };
        let _global = self
            .global
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Stopped)?;
        // The queue may have filled while this waited.
        engine.check_queue()?;
        let engine = engine.clone();
        tokio::task::spawn_blocking(move || match input {
            Input::Chat(m) => engine
                .apply_chat_template(&m)
                .and_then(|p| engine.tokenize(&p)),
            Input::Tools(c, format) => {
                render_tools(&engine, &c, format).and_then(|p| engine.tokenize(&p))
            }
            Input::Text(t) => engine.tokenize(&t),
        })
        .await
        .map_err(|_| Error::Stopped)?
    }
}
