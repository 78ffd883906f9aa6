//! The one table of Entra ID's AADSTS codes that an admin will hit (docs/exchange-online.md,
//! "AADSTS codes"): what each means, how to fix it, and whether it only says "slow down".
//!
//! Invariant: every code has a meaning and a fix; the token error's retry decision, its
//! one-line hint and doctor's explanation all read this table, so they cannot disagree.

/// One AADSTS code and what to do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Aadsts {
    pub code: u32,
    /// What the code means, for doctor's explanation.
    pub meaning: &'static str,
    /// What the administrator should do, in one line.
    pub fix: &'static str,
    /// Throttling: retry with backoff, nothing is misconfigured.
    pub throttling: bool,
}

const fn entry(code: u32, meaning: &'static str, fix: &'static str) -> Aadsts {
    Aadsts {
        code,
        meaning,
        fix,
        throttling: false,
    }
}

const SCOPE_FIX: &str = "use exactly https://outlook.office365.com/.default as the scope";
const TENANT_FIX: &str =
    "tenant not found: check the tenant id; a sovereign-cloud tenant needs its own authority";
const CERTIFICATE_FIX: &str =
    "upload the certificate to the app registration; x5t must be the SHA-1 thumbprint";
const THROTTLED_FIX: &str =
    "throttled by Entra ID: back off (tokens are cached; check for other clients of this app)";

/// Every code ccmail explains.
pub const AADSTS: &[Aadsts] = &[
    entry(
        7000215,
        "invalid client secret",
        "paste the client secret's Value, not its Secret ID",
    ),
    entry(
        7000222,
        "the client secret has expired (secrets last at most 24 months)",
        "the client secret expired: create a new secret (or use a certificate) and update the app with `ccmail app rotate-secret`",
    ),
    entry(
        7000218,
        "the request carried no credential",
        "the request carried no credential: configure a client secret or certificate for the app",
    ),
    entry(
        700016,
        "the application was not found in the tenant",
        "application not found in this tenant: check the client id and the tenant; a multi-tenant app needs admin consent in this tenant",
    ),
    entry(90002, "the tenant was not found", TENANT_FIX),
    entry(900023, "the tenant id is malformed", TENANT_FIX),
    entry(
        90038,
        "the tenant is in another national cloud",
        "the tenant is in another national cloud: change the authority (US Gov https://login.microsoftonline.us, China https://login.partner.microsoftonline.cn)",
    ),
    entry(
        9001023,
        "the tenant `common` cannot be used for client credentials",
        "the tenant `common` cannot be used with client credentials: use the tenant id or a verified domain",
    ),
    entry(70011, "the scope is invalid", SCOPE_FIX),
    entry(1002012, "the scope must end in /.default", SCOPE_FIX),
    entry(700022, "the scope names several resources", SCOPE_FIX),
    entry(
        500011,
        "the resource principal (Exchange Online) was not found in the tenant",
        "resource principal not found: the resource the scope names does not exist in this tenant; with the scope https://outlook.office365.com/.default the tenant lacks the Office 365 Exchange Online service principal (no Exchange Online subscription), or the tenant id or cloud is another one",
    ),
    entry(
        700027,
        "the client assertion's certificate is not registered or its signature is invalid",
        CERTIFICATE_FIX,
    ),
    entry(
        50012,
        "the client assertion was refused (audience, issuer or validity)",
        CERTIFICATE_FIX,
    ),
    entry(
        7000112,
        "the application is disabled",
        "the application is disabled: enable the enterprise application",
    ),
    entry(
        53003,
        "blocked by Conditional Access",
        "blocked by Conditional Access: adjust the workload-identity policy",
    ),
    Aadsts {
        throttling: true,
        ..entry(
            50196,
            "too many token requests (loop detected)",
            THROTTLED_FIX,
        )
    },
    Aadsts {
        throttling: true,
        ..entry(90055, "the tenant is throttled", THROTTLED_FIX)
    },
];

/// The table's entry for `code`.
pub fn lookup(code: u32) -> Option<&'static Aadsts> {
    AADSTS.iter().find(|e| e.code == code)
}

/// The fix for `code`, if the table has it.
pub fn aadsts_fix(code: u32) -> Option<&'static str> {
    lookup(code).map(|e| e.fix)
}

/// What `code` means, if the table has it.
pub fn aadsts_meaning(code: u32) -> Option<&'static str> {
    lookup(code).map(|e| e.meaning)
}

/// `code` only says "slow down".
pub fn is_throttling(code: u32) -> bool {
    lookup(code).is_some_and(|e| e.throttling)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_listed_once_and_throttling_is_only_the_two_codes() {
        for (i, e) in AADSTS.iter().enumerate() {
            assert!(
                AADSTS[i + 1..].iter().all(|o| o.code != e.code),
                "{}",
                e.code
            );
            assert!(!e.meaning.is_empty() && !e.fix.is_empty());
        }
        let throttling: Vec<u32> = AADSTS
            .iter()
            .filter(|e| e.throttling)
            .map(|e| e.code)
            .collect();
        assert_eq!(throttling, [50196, 90055]);
    }
}
