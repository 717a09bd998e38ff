//! Fencing tokens of `leader-election`, checked over a history of grants
//! and reads of one role.
//!
//! A lease's token grows every time the role changes hands. So, for any
//! two grants where the first completed before the second was sent, the
//! second's token is at least the first's, and greater when the holder
//! changed; no token is ever granted to two holders; and a read sent after
//! a grant completed sees that token or a later one.

/// One observation of a role.
#[derive(Debug, Clone)]
pub struct Observation {
    /// When it was sent.
    pub call: u64,
    /// When its answer came.
    pub ret: u64,
    /// Who holds the role, by the answer.
    pub holder: String,
    /// Its fencing token.
    pub token: u64,
    /// A grant (acquire or renew answered 200), or a read.
    pub grant: bool,
}

/// The violations in `history`, in words; empty when there are none.
pub fn violations(history: &[Observation]) -> Vec<String> {
    let mut out = Vec::new();
    let mut by_token: std::collections::BTreeMap<u64, &str> = Default::default();
    for g in history.iter().filter(|o| o.grant) {
        if let Some(other) = by_token.insert(g.token, &g.holder)
            && other != g.holder
        {
            out.push(format!(
                "token {} granted to both {other} and {}",
                g.token, g.holder
            ));
        }
    }
    let mut grants: Vec<&Observation> = history.iter().filter(|o| o.grant).collect();
    grants.sort_by_key(|g| g.ret);
    let mut later: Vec<&Observation> = history.iter().collect();
    later.sort_by_key(|o| o.call);
    // For each observation, the grant with the highest token among those
    // that completed before it was sent.
    let mut best: Option<&Observation> = None;
    let mut g = 0;
    for o in later {
        while g < grants.len() && grants[g].ret < o.call {
            if best.is_none_or(|b| grants[g].token > b.token) {
                best = Some(grants[g]);
            }
            g += 1;
        }
        let Some(b) = best else { continue };
        let kind = if o.grant { "grant" } else { "read" };
        if o.token < b.token {
            out.push(format!(
                "{kind} of token {} to {} after token {} was granted to {}",
                o.token, o.holder, b.token, b.holder
            ));
        } else if o.grant && o.token == b.token && o.holder != b.holder {
            out.push(format!(
                "token {} granted to {} after it was granted to {}",
                o.token, o.holder, b.holder
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(call: u64, ret: u64, holder: &str, token: u64, grant: bool) -> Observation {
        Observation {
            call,
            ret,
            holder: holder.into(),
            token,
            grant,
        }
    }

    #[test]
    fn tokens_that_grow_with_each_new_holder_pass() {
        let h = [
            obs(0, 1, "a", 1, true),
            obs(2, 3, "a", 1, true), // a renews
            obs(4, 5, "a", 1, false),
            obs(6, 7, "b", 2, true),
            obs(8, 9, "b", 2, false),
            // Concurrent with b's grant: may see either.
            obs(5, 10, "a", 1, false),
        ];
        assert!(violations(&h).is_empty(), "{:?}", violations(&h));
    }

    #[test]
    fn a_token_given_to_two_holders_is_caught() {
        let h = [obs(0, 5, "a", 3, true), obs(1, 6, "b", 3, true)];
        assert!(violations(&h)[0].contains("token 3 granted to both"));
    }

    #[test]
    fn a_token_that_goes_back_is_caught() {
        let h = [obs(0, 1, "a", 4, true), obs(2, 3, "b", 3, true)];
        assert_eq!(violations(&h).len(), 1);
        let stale_read = [obs(0, 1, "a", 4, true), obs(2, 3, "z", 2, false)];
        assert_eq!(violations(&stale_read).len(), 1);
    }
}
