"""Verification of serving quality: content-addressed model identity, challenges, attestations.

``merkle`` (chunk-hash tree and proofs), ``fileid`` (a GGUF's SHA-256 and chunk root, cached),
``challenge`` (nonce-salted prompts and the tolerance check), ``attestations`` (signed verdicts
carried in the signer's cluster-state record), ``reputation`` (decaying score and exclusion) and
``verifier`` (the owned background task that challenges peers and answers their challenges).
"""
