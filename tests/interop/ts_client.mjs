#!/usr/bin/env node
// Interop client: the official TypeScript SDK talking to a Portcullis gateway (or any MCP server).
//
//   node tests/interop/ts_client.mjs --url http://127.0.0.1:PORT/mcp [--token T] [--tool NAME] [--args '{"k":1}']
//
// Connects (initialize handshake, the TypeScript SDK's own protocol version), lists tools,
// optionally calls one, and prints exactly one JSON object on stdout:
//   {"ok": true, "protocolVersion", "serverInfo", "tools": [names], "result": CallToolResult|null}
// or, on any failure, {"ok": false, "error": "...", "code": <JSON-RPC code or null>} with exit status 1.
// Nothing else is written to stdout, so callers can json.loads() it.
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { parseArgs } from 'node:util';

const { values } = parseArgs({
  options: {
    url: { type: 'string' },
    token: { type: 'string' },
    tool: { type: 'string' },
    args: { type: 'string', default: '{}' },
  },
});

function emit(obj, status) {
  process.stdout.write(JSON.stringify(obj) + '\n');
  process.exitCode = status;
}

async function main() {
  if (!values.url) throw new Error('--url is required');
  const headers = values.token ? { Authorization: `Bearer ${values.token}` } : {};
  const transport = new StreamableHTTPClientTransport(new URL(values.url), { requestInit: { headers } });
  const client = new Client({ name: 'portcullis-ts-interop', version: '1.0.0' });
  await client.connect(transport);
  try {
    const listed = await client.listTools();
    let result = null;
    if (values.tool) {
      result = await client.callTool({ name: values.tool, arguments: JSON.parse(values.args) });
    }
    emit(
      {
        ok: true,
        protocolVersion: transport.protocolVersion ?? null,
        serverInfo: client.getServerVersion() ?? null,
        tools: listed.tools.map((t) => t.name),
        result,
      },
      0,
    );
  } finally {
    await client.close();
  }
}

main().catch((err) => {
  emit({ ok: false, error: String(err?.message ?? err), code: typeof err?.code === 'number' ? err.code : null }, 1);
});
