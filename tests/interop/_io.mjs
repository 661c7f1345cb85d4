// Shared plumbing for the interop scripts: one JSON object in on stdin, one JSON object out on stdout.
export async function readInput() {
  const chunks = []
  for await (const chunk of process.stdin) chunks.push(chunk)
  return JSON.parse(Buffer.concat(chunks).toString('utf8'))
}

export function writeOutput(value) {
  process.stdout.write(JSON.stringify(value) + '\n')
}
