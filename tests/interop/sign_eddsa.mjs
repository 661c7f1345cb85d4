// Signs a DID-JWT with did-jwt's own EdDSA signer for a did:key derived here, independently of Hearth.
// stdin: {"seed_hex": "<32-byte Ed25519 seed>", "payload": {...}}
// stdout: {"did": "did:key:z6Mk...", "token": "<compact JWS>"}
import { createJWT, EdDSASigner, bytesToMultibase, hexToBytes } from 'did-jwt'
import { ed25519 } from '@noble/curves/ed25519'
import { readInput, writeOutput } from './_io.mjs'

const { seed_hex: seedHex, payload } = await readInput()
const seed = hexToBytes(seedHex)
const fingerprint = bytesToMultibase(ed25519.getPublicKey(seed), 'base58btc', 'ed25519-pub')
const did = `did:key:${fingerprint}`
const token = await createJWT(
  payload,
  { issuer: did, signer: EdDSASigner(seed) },
  { alg: 'EdDSA', kid: `${did}#${fingerprint}`, typ: 'JWT' }
)
writeOutput({ did, token })
