//! The admin API's bearer tokens: the hashes of `[[http.token]]`, parsed again when a
//! reload changed the configuration, and the tokens verified before, remembered by their
//! SHA-256.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use http::{HeaderMap, header};
use sha2::{Digest as _, Sha256};

use crate::broker::Broker;
use crate::config::{HttpConfig, Role};
use crate::passwd::Phc;

/// Verified tokens remembered at most (by SHA-256); beyond, the memory starts over.
const KNOWN_TOKENS: usize = 256;

/// One configured token: its name, role and hash.
type Token = (String, Role, Phc);

/// The configured tokens, parsed again when a reload changed the configuration.
pub(crate) struct Tokens {
    /// (configuration generation, its tokens).
    parsed: RwLock<(u64, Arc<Vec<Token>>)>,
    /// SHA-256 of a token verified before → its index (cleared with every new list).
    known: Mutex<HashMap<[u8; 32], usize>>,
}

fn parse_tokens(cfg: &HttpConfig) -> Vec<Token> {
    (cfg.token.iter())
        .filter_map(|t| Some((t.name.clone(), t.role, Phc::parse(&t.hash)?)))
        .collect()
}

impl Tokens {
    pub(crate) fn new(broker: &Broker) -> Tokens {
        Tokens {
            parsed: RwLock::new((
                broker.config_generation(),
                Arc::new(parse_tokens(&broker.current().http)),
            )),
            known: Mutex::new(HashMap::new()),
        }
    }

    /// The tokens of the configuration in force.
    fn list(&self, broker: &Broker) -> Arc<Vec<Token>> {
        let generation = broker.config_generation();
        {
            let p = self.parsed.read().unwrap_or_else(|e| e.into_inner());
            if p.0 == generation {
                return p.1.clone();
            }
        }
        let list = Arc::new(parse_tokens(&broker.current().http));
        *self.parsed.write().unwrap_or_else(|e| e.into_inner()) = (generation, list.clone());
        self.known.lock().unwrap_or_else(|e| e.into_inner()).clear();
        list
    }

    /// The name and role of the token `headers` carry, if it is one of ours.
    pub(crate) fn check(&self, broker: &Broker, headers: &HeaderMap) -> Option<(String, Role)> {
        let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let token = token.trim().as_bytes();
        let list = self.list(broker);
        let digest: [u8; 32] = Sha256::digest(token).into();
        let known = (self.known.lock().unwrap_or_else(|p| p.into_inner()))
            .get(&digest)
            .copied();
        let i = match known {
            Some(i) => i,
            None => {
                let i = (list.iter()).position(|(_, _, phc)| phc.verify(token))?;
                let mut m = self.known.lock().unwrap_or_else(|p| p.into_inner());
                if m.len() >= KNOWN_TOKENS {
                    m.clear();
                }
                m.insert(digest, i);
                i
            }
        };
        list.get(i).map(|(n, r, _)| (n.clone(), *r))
    }
}
