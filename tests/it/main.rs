mod dovecot_harness;
mod support;
