//! OAuth 2.0 client-credentials tokens for Exchange Online.
