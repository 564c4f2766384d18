"""The OVF_STORE format: oVirt OVF documents and the tar archive that holds them.

Ground floor: nothing here knows about domains, volumes or the doors; callers
hand in bytes and get values or errors back. One purpose per room:

- `model`: what an OVF says (`Entity`, `Disk`, `Snapshot`) and `OvfError`;
- `safexml`: the gate for untrusted XML (DTD refusal, safe parsers, `OvfValidator`);
- `reader`: the OVF dialects read into the model (`parse`);
- `tarstream`: the archive - member names, framing checked as it streams, writing;
- `workers`: the processes that parse OVFs - byte ranges of an archive they read
  from a path themselves, or documents in batches (`batches`);
- `vmparams`: an OVF as VDSM's legacy ``vmParams`` (start a VM from its OVF).
"""
