// Signs a DID-JWT with did-jwt's ES256K signer for a did:pkh:eip155 account derived here.
// The address is written in lower case, as many wallets send it.
// stdin: {"private_key_hex": "<32 bytes>", "chain_id": 1, "payload": {...}}
// stdout: {"did": "did:pkh:eip155:1:0x...", "token": "<compact JWS>"}
import { createJWT, ES256KSigner, bytesToHex, hexToBytes, toEthereumAddress } from 'did-jwt'
import { secp256k1 } from '@noble/curves/secp256k1'
import { readInput, writeOutput } from './_io.mjs'

const { private_key_hex: privateKeyHex, chain_id: chainId, payload } = await readInput()
const privateKey = hexToBytes(privateKeyHex)
// toEthereumAddress takes the uncompressed key as hex "04..." and drops that first byte.
const address = toEthereumAddress(bytesToHex(secp256k1.getPublicKey(privateKey, false))).toLowerCase()
const did = `did:pkh:eip155:${chainId}:${address}`
const token = await createJWT(
  payload,
  { issuer: did, signer: ES256KSigner(privateKey) },
  { alg: 'ES256K', kid: `${did}#blockchainAccountId`, typ: 'JWT' }
)
writeOutput({ did, token })
