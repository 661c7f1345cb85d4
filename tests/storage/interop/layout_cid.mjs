// The root CID ipfs-car's file encoder gives a file under a chosen chunk size and DAG width.
// Input (stdin JSON): {"path": "...", "chunk_size": N, "width": N}. Output: {"cid": "..."}.
// Tests use small values to check deep balanced layouts against Hearth's importer without GiB inputs.
import fs from 'node:fs'
import { Readable } from 'node:stream'
import * as UnixFS from '@ipld/unixfs'
import { withMaxChunkSize } from '@ipld/unixfs/file/chunker/fixed'
import { withWidth } from '@ipld/unixfs/file/layout/balanced'
import * as raw from 'multiformats/codecs/raw'
import { createFileEncoderStream } from 'ipfs-car'
import { readInput, writeOutput } from '../../interop/_io.mjs'

const { path, chunk_size: chunkSize, width } = await readInput()
const settings = UnixFS.configure({
  fileChunkEncoder: raw,
  smallFileEncoder: raw,
  chunker: withMaxChunkSize(chunkSize),
  fileLayout: withWidth(width)
})
const file = { stream: () => Readable.toWeb(fs.createReadStream(path)) }
let last
await createFileEncoderStream(file, settings).pipeTo(new WritableStream({ write (block) { last = block } }))
writeOutput({ cid: last.cid.toString() })
