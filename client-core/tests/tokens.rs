//! The client's token transitions (`docs/PROTOCOL.md` 2.5 and 5.5): proactive refresh ahead
//! of expiry, the in-band `&token` and its replies, `!subscription-ended`, and what a refused
//! token (a 401 at the handshake, a close 4003) leads to with and without a provider.

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

use ivy_client_core::client::{Action, Client, ClientError, ClientEvent, Config, ConnState, Start, SubscriptionError, Token};
use ivy_client_core::close_code;
use ivy_client_core::wire::ErrorCode;

fn actions(c: &mut Client) -> Vec<Action> {
    std::iter::from_fn(|| c.poll_action()).collect()
}

fn events(c: &mut Client) -> Vec<ClientEvent> {
    std::iter::from_fn(|| c.poll_event()).collect()
}

fn token(value: &str, expires_at: u64) -> Token {
    Token { value: value.into(), expires_at: Some(expires_at) }
}

/// A client with a provider and a token expiring at 90 s, connected at 0 and answering.
fn connected(provider: bool) -> Client {
    let mut c = Client::new(Config::default().token_provider(provider), 1);
    c.set_token(0, token("t1", 90_000));
    c.start(0);
    assert_eq!(actions(&mut c), [Action::Connect]);
    assert_eq!(c.token(), Some("t1"), "the handshake presents the initial token");
    c.handle_connected(0);
    let _ = c.timestamp(0).unwrap();
    c.handle_frame(1, "#1#@1700000000.000000000");
    let _ = (actions(&mut c), events(&mut c));
    c
}

#[test]
fn from_exp_puts_the_expiry_on_the_drivers_clock() {
    let t = Token::from_exp("secret", Some(1_700_000_060), 1_700_000_000_000, 5_000);
    assert_eq!(t.expires_at, Some(65_000));
    assert_eq!(Token::from_exp("x", Some(1), 1_700_000_000_000, 5_000).expires_at, Some(5_000), "already expired: now");
    assert_eq!(Token::from_exp("x", None, 0, 5).expires_at, None);
    assert_eq!(Token::new("x").expires_at, None);
    assert!(!format!("{t:?}").contains("secret"), "a token is never in a log");
}

#[test]
fn a_fresh_token_is_asked_for_ahead_of_expiry_and_sent_in_band() {
    let mut c = connected(true);
    // 90 s left at 0: a third is 30 s, the cap is 30 s: at 60 s.
    assert_eq!(c.poll_timeout(), Some(30_001), "the keepalive first");
    c.handle_timeout(59_999);
    assert!(!actions(&mut c).contains(&Action::NeedToken));
    c.handle_timeout(60_000);
    assert!(actions(&mut c).contains(&Action::NeedToken));
    c.handle_timeout(60_001);
    assert!(!actions(&mut c).contains(&Action::NeedToken), "one at a time");
    c.handle_token(60_100, Ok(token("t2", 150_000)));
    assert_eq!(c.token(), Some("t2"));
    let sent = actions(&mut c);
    assert_eq!(sent.len(), 1);
    let Action::Send(frame) = &sent[0] else { panic!("{sent:?}") };
    assert!(frame.ends_with("#&t2") && frame.starts_with('#'), "{frame}");
    let key = &frame[1..frame.len() - 4];
    c.handle_frame(60_200, &format!("#{key}#@1700000060.000000000"));
    assert!(events(&mut c).is_empty(), "a success is silent");
    assert_eq!(c.state(), ConnState::Connected);
    // 10 s lifetime: a third of it ahead.
    c.set_token(200_000, token("t3", 209_000));
    let _ = actions(&mut c);
    c.handle_timeout(205_999);
    assert!(!actions(&mut c).contains(&Action::NeedToken));
    c.handle_timeout(206_000);
    assert!(actions(&mut c).contains(&Action::NeedToken));
}

#[test]
fn without_a_provider_nothing_is_asked_and_an_expired_token_needs_no_refresh() {
    let mut c = connected(false);
    c.handle_timeout(89_000);
    assert!(!actions(&mut c).contains(&Action::NeedToken));
    let mut c = connected(true);
    c.set_token(0, token("old", 0));
    let _ = actions(&mut c);
    c.handle_timeout(1);
    assert!(!actions(&mut c).contains(&Action::NeedToken), "no loop over an expired token: the server's refusal handles it");
}

#[test]
fn a_refused_refresh_keeps_the_connection() {
    let mut c = connected(true);
    c.set_token(10, token("bad", 100_000));
    let Some(Action::Send(frame)) = c.poll_action() else { panic!() };
    let key = frame[1..].split('#').next().unwrap().to_string();
    c.handle_frame(20, &format!("#{key}#!unauthorized a refreshed token must have the same sub (\"ada\")"));
    let ev = events(&mut c);
    let [ClientEvent::TokenRefused { error: ClientError::Server { code, message } }] = &ev[..] else { panic!("{ev:?}") };
    assert_eq!(*code, ErrorCode::Unauthorized);
    assert!(message.contains("same sub"));
    assert_eq!(c.state(), ConnState::Connected);
}

#[test]
fn a_token_given_during_an_attempt_is_sent_once_connected() {
    let mut c = Client::new(Config::default(), 1);
    c.start(0);
    let _ = actions(&mut c);
    c.set_token(5, Token::new("later"));
    assert_eq!(actions(&mut c), [], "not connected yet");
    c.handle_connected(10);
    assert_eq!(actions(&mut c), [Action::Send("#1#&later".into())]);
    // A connection opened with the newest token sends nothing.
    c.handle_disconnected(20);
    let ConnState::Reconnecting { retry_at, .. } = c.state() else { panic!() };
    c.handle_timeout(retry_at);
    assert_eq!(actions(&mut c), [Action::Connect]);
    c.handle_connected(retry_at);
    assert_eq!(actions(&mut c), []);
}

#[test]
fn subscription_ended_removes_the_subscriptions_of_the_path() {
    let mut c = connected(true);
    let a = c.subscribe(2, "/chat/room1", Start::Now).unwrap();
    let b = c.subscribe(2, "/chat/room1", Start::Now).unwrap();
    let other = c.subscribe(2, "/chat", Start::Now).unwrap();
    let _ = actions(&mut c);
    let line = "!subscription-ended /chat/room1 the new token of \"ada\" has no read grant covering /chat/room1";
    c.handle_frame(3, line);
    let reason = line["!subscription-ended ".len()..].to_string();
    assert_eq!(
        events(&mut c),
        [
            ClientEvent::SubscriptionEnded { sub: a, reason: reason.clone() },
            ClientEvent::SubscriptionEnded { sub: b, reason: reason.clone() }
        ]
    );
    assert_eq!((c.sub_path(a), c.sub_path(b), c.sub_path(other)), (None, None, Some("/chat")));
    assert!(SubscriptionError::Ended(reason).to_string().starts_with("subscription ended by the server: /chat/room1 "));
    // Not resubscribed after a reconnect.
    c.handle_disconnected(4);
    let ConnState::Reconnecting { retry_at, .. } = c.state() else { panic!() };
    c.handle_timeout(retry_at);
    let _ = actions(&mut c);
    c.handle_connected(retry_at);
    let sent = actions(&mut c);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(matches!(&sent[0], Action::Send(f) if f.ends_with("+/chat")));
    let _ = events(&mut c);
    c.handle_frame(retry_at, "!subscription-ended /nothing/here gone");
    assert!(matches!(&events(&mut c)[..], [ClientEvent::Warning(_)]));
}

#[test]
fn a_4003_with_a_provider_asks_once_and_reconnects_with_the_fresh_token() {
    let mut c = connected(true);
    let _ = c.subscribe(2, "/a", Start::Now).unwrap();
    let _ = actions(&mut c);
    c.handle_close(100_000, Some(close_code::TOKEN_EXPIRED), "token expired: refresh it in-band or reconnect with a fresh token");
    assert_eq!(c.state(), ConnState::AwaitingToken);
    assert_eq!(actions(&mut c), [Action::NeedToken]);
    assert_eq!(c.unauthorized_reason(), Some("token expired: refresh it in-band or reconnect with a fresh token"));
    assert_eq!(c.poll_timeout(), Some(130_000), "the provider's deadline; no retry before the token");
    c.handle_token(100_500, Ok(token("t2", 200_000)));
    assert_eq!(c.state(), ConnState::Connecting { attempt: 0 });
    assert_eq!(actions(&mut c), [Action::Connect]);
    assert_eq!(c.token(), Some("t2"));
    c.handle_connected(100_600);
    let sent = actions(&mut c);
    assert!(sent.iter().all(|a| !matches!(a, Action::Send(f) if f.contains('&'))), "opened with it: no refresh: {sent:?}");
    assert!(sent.iter().any(|a| matches!(a, Action::Send(f) if f.ends_with("+/a"))), "resubscribed: {sent:?}");
}

#[test]
fn a_401_then_a_refused_fresh_token_is_terminal() {
    let mut c = Client::new(Config::default().token_provider(true).offline_queue(10), 1);
    c.set_token(0, token("t1", 1000));
    c.start(0);
    let _ = actions(&mut c);
    let _ = c.subscribe(0, "/a", Start::Now).unwrap();
    let queued = c.send(0, "/a", "x").unwrap();
    c.handle_unauthorized(10, "token expired");
    assert_eq!((c.state(), actions(&mut c)), (ConnState::AwaitingToken, vec![Action::NeedToken]));
    c.handle_token(20, Ok(token("t2", 100_000)));
    assert_eq!(actions(&mut c), [Action::Connect]);
    let _ = events(&mut c);
    c.handle_unauthorized(30, "bad signature");
    assert_eq!(c.state(), ConnState::Unauthorized);
    assert_eq!(actions(&mut c), [], "no more attempts");
    let ev = events(&mut c);
    assert!(ev.contains(&ClientEvent::Sent { id: queued, result: Err(ClientError::Unauthorized) }), "{ev:?}");
    assert!(ev.contains(&ClientEvent::Unauthorized { reason: "bad signature".into() }), "{ev:?}");
    assert_eq!(ev.last(), Some(&ClientEvent::State(ConnState::Unauthorized)));
    assert_eq!(c.poll_timeout(), None, "nothing more to do, ever");
    assert_eq!(c.send(40, "/a", "y"), Err(ClientError::Unauthorized));
    assert_eq!(c.subscribe(40, "/a", Start::Now), Err(ClientError::Unauthorized));
    assert_eq!(c.timestamp(40), Err(ClientError::Unauthorized));
    c.handle_timeout(1_000_000);
    c.set_token(1_000_000, Token::new("t3"));
    assert_eq!((c.state(), actions(&mut c)), (ConnState::Unauthorized, vec![]));
}

#[test]
fn a_provider_with_no_token_or_no_answer_is_terminal() {
    let mut c = connected(true);
    c.handle_close(100_000, Some(close_code::TOKEN_EXPIRED), "token expired");
    let _ = actions(&mut c);
    c.handle_token(100_001, Err("signed out".into()));
    assert_eq!(c.state(), ConnState::Unauthorized);
    assert_eq!(c.unauthorized_reason(), Some("token expired; no fresh token: signed out"));
    assert!(events(&mut c).contains(&ClientEvent::Unauthorized { reason: "token expired; no fresh token: signed out".into() }));

    let mut c = connected(true);
    c.handle_close(100_000, Some(close_code::TOKEN_EXPIRED), "token expired");
    let _ = actions(&mut c);
    c.handle_timeout(129_999);
    assert_eq!(c.state(), ConnState::AwaitingToken);
    c.handle_timeout(130_000);
    assert_eq!(c.state(), ConnState::Unauthorized);
    assert_eq!(c.unauthorized_reason(), Some("token expired; no fresh token: the token provider did not answer in time"));
}

#[test]
fn without_a_provider_the_first_refusal_is_terminal_and_other_closes_reconnect() {
    let mut c = connected(false);
    c.handle_close(1000, Some(1006), "");
    assert!(matches!(c.state(), ConnState::Reconnecting { .. }), "not about the token");
    let ConnState::Reconnecting { retry_at, .. } = c.state() else { unreachable!() };
    c.handle_timeout(retry_at);
    let _ = actions(&mut c);
    c.handle_unauthorized(retry_at + 1, "token expired");
    assert_eq!(c.state(), ConnState::Unauthorized);
    assert_eq!(actions(&mut c), []);
    // Nothing to do in other states.
    let mut idle = Client::new(Config::default(), 1);
    idle.handle_unauthorized(0, "x");
    assert_eq!(idle.state(), ConnState::Idle);
}

#[test]
fn a_connection_that_worked_earns_another_ask() {
    let mut c = connected(true);
    for round in 0..3u64 {
        let now = 100_000 * (round + 1);
        c.handle_close(now, Some(close_code::TOKEN_EXPIRED), "token expired");
        assert_eq!(actions(&mut c), [Action::NeedToken], "round {round}");
        c.handle_token(now + 1, Ok(token("t", now + 90_000)));
        assert_eq!(actions(&mut c), [Action::Connect]);
        c.handle_connected(now + 2);
        let _ = c.timestamp(now + 2).unwrap();
        let Some(Action::Send(f)) = c.poll_action() else { panic!() };
        let key = f[1..].split('#').next().unwrap().to_string();
        c.handle_frame(now + 3, &format!("#{key}#@1700000000.000000000"));
    }
    assert_eq!(c.state(), ConnState::Connected);
}

#[test]
fn a_refresh_outstanding_at_a_4003_answers_it() {
    let mut c = connected(true);
    c.handle_timeout(60_000);
    assert!(actions(&mut c).contains(&Action::NeedToken));
    c.handle_close(61_000, Some(close_code::TOKEN_EXPIRED), "token expired");
    assert_eq!(actions(&mut c), [], "the request already out answers both");
    c.handle_token(61_500, Ok(token("t2", 200_000)));
    assert_eq!(actions(&mut c), [Action::Connect]);
}
