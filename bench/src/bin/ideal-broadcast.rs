//! The floor for the fan-out benchmarks: a minimal broadcast server on tokio-tungstenite.
//!
//! Every text message received is sent to every other connection, its bytes shared; nothing
//! else: no protocol, no channels, no storage, no acks. A full outbound queue drops the message
//! for that connection (the benchmark keeps queues short, so nothing is dropped in practice).
//!
//! Usage: `ideal-broadcast [ADDR]` (default `127.0.0.1:9001`); prints the address it listens on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

type Peers = Arc<RwLock<HashMap<u64, mpsc::Sender<Message>>>>;

/// Outbound queue per connection, as `ivy-server`'s default.
const QUEUE: usize = 1024;
/// Most queued messages written before one flush, as `ivy-server`.
const COALESCE: usize = 256;

#[tokio::main]
async fn main() {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9001".to_owned());
    let listener = match TcpListener::bind(&addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ideal-broadcast: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    match listener.local_addr() {
        Ok(a) => println!("ideal-broadcast listening on ws://{a}"),
        Err(e) => eprintln!("ideal-broadcast: {e}"),
    }
    let peers: Peers = Arc::default();
    let next = AtomicU64::new(0);
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let id = next.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(connection(stream, id, peers.clone()));
    }
}

async fn connection(stream: TcpStream, id: u64, peers: Peers) {
    let _ = stream.set_nodelay(true);
    // The same buffer sizes as ivy-server's WebSocket layer.
    let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(16 * 1024);
    let Ok(ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else { return };
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Message>(QUEUE);
    peers.write().unwrap_or_else(PoisonError::into_inner).insert(id, tx);
    let writer = async move {
        while let Some(first) = rx.recv().await {
            if sink.feed(first).await.is_err() {
                break;
            }
            for _ in 1..COALESCE {
                match rx.try_recv() {
                    Ok(m) => {
                        if sink.feed(m).await.is_err() {
                            return;
                        }
                    }
                    Err(_) => break,
                }
            }
            if sink.flush().await.is_err() {
                break;
            }
        }
    };
    let reader = {
        let peers = peers.clone();
        async move {
            while let Some(Ok(msg)) = stream.next().await {
                match msg {
                    Message::Text(text) => {
                        let map = peers.read().unwrap_or_else(PoisonError::into_inner);
                        for (other, tx) in map.iter() {
                            if *other != id {
                                let _ = tx.try_send(Message::Text(text.clone()));
                            }
                        }
                    }
                    Message::Close(_) => break,
                    _ => {}
                }
            }
            peers.write().unwrap_or_else(PoisonError::into_inner).remove(&id);
        }
    };
    tokio::select! {
        _ = writer => {}
        _ = reader => {}
    }
    peers.write().unwrap_or_else(PoisonError::into_inner).remove(&id);
}
