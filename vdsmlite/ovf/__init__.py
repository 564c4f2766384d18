"""oVirt OVF documents: the per-VM/template descriptors kept in OVF_STORE volumes."""
