//! Every SQL statement ccmail runs lives in this module.
