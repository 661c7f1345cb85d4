// Verifies a DID-JWT with did-jwt's verifyJWT: did:key through key-did-resolver, did:pkh:eip155 through
// the DID document the did:pkh method spec defines (no pkh resolver package is installed).
// stdin: {"token": "<compact JWS>", "audience": "<DID>"}
// stdout: {"verified": true, "issuer", "kid", "payload"} or {"verified": false, "error": "<message>"}
import { verifyJWT } from 'did-jwt'
import { Resolver } from 'did-resolver'
import { getResolver as getKeyResolver } from 'key-did-resolver'
import { readInput, writeOutput } from './_io.mjs'

function pkhResolver() {
  return {
    pkh: async (did, parsed) => {
      const [namespace, reference, address] = parsed.id.split(':')
      if (namespace !== 'eip155' || !reference || !/^0x[0-9a-fA-F]{40}$/.test(address ?? '')) {
        return { didResolutionMetadata: { error: 'invalidDid' }, didDocument: null, didDocumentMetadata: {} }
      }
      const keyId = `${did}#blockchainAccountId`
      return {
        didResolutionMetadata: { contentType: 'application/did+json' },
        didDocument: {
          id: did,
          verificationMethod: [
            {
              id: keyId,
              type: 'EcdsaSecp256k1RecoveryMethod2020',
              controller: did,
              blockchainAccountId: `eip155:${reference}:${address}`,
            },
          ],
          authentication: [keyId],
          assertionMethod: [keyId],
        },
        didDocumentMetadata: {},
      }
    },
  }
}

const { token, audience } = await readInput()
const resolver = new Resolver({ ...getKeyResolver(), ...pkhResolver() })
try {
  const result = await verifyJWT(token, { resolver, audience })
  writeOutput({ verified: true, issuer: result.issuer, kid: result.signer.id, payload: result.payload })
} catch (error) {
  writeOutput({ verified: false, error: String(error?.message ?? error) })
}
