// An OAuth 2.1 authorization server (and OpenID Connect issuer) for Portcullis' tests: oidc-provider
// (npm, pinned in package.json), configured the way an MCP upstream's authorization server, or a
// company's OpenID Connect issuer in front of the gateway, is expected to behave, plus a few
// test-only control endpoints under /test/.
//
//   node tests/support/oidc/provider.mjs ['{"accessTokenTtl": 60, "clients": [...]}']
//
// It listens on 127.0.0.1, on the configured port or one the kernel picks, and prints exactly one
// line on stdout once it serves: `READY http://127.0.0.1:PORT` (the issuer). Everything else goes
// to stderr.
//
// Configuration: an optional JSON argument, with environment fallbacks for the lifetimes:
//   accessTokenTtl  (ACCESS_TOKEN_TTL, seconds, default 60)
//   refreshTokenTtl (REFRESH_TOKEN_TTL, seconds, default 3600)
//   clients         pre-registered clients, oidc-provider client metadata
//                   ({client_id, client_secret, redirect_uris, token_endpoint_auth_method, ...})
//   resourceScopes  the scopes of every resource server (default "mail.read mail.send mcp:tools")
//   port            the port to listen on (default 0: any free one). A test that restarts the
//                   provider on the same port gets the same issuer, with nothing stored before
//                   (no registrations, grants or refresh tokens survive a restart).
//   keys            the signing keys, private RSA JWKs with a `kid` (default: one generated at
//                   start, kid "test-rs256"). The first signs new tokens; all are published in
//                   the JWKS, so [B, A] is "rotated to B, A still trusted".
//   groups          {"ada": ["mcp-users"], "grace": []}: a `groups` claim (a list of strings) in
//                   the access tokens of those subjects; other subjects get no such claim.
//
// What it does, and why:
// - authorization code with PKCE, required for every client; oidc-provider 9 only knows S256.
// - refresh tokens rotate on every use; presenting a used one is refused with invalid_grant (and
//   oidc-provider then revokes the whole grant: reuse is treated as a stolen token).
// - a refresh token is issued to every client allowed the refresh_token grant, with or without
//   the offline_access scope (oidc-provider's default wants offline_access, which it only keeps
//   with prompt=consent); it does not expire with the browser session.
// - resource indicators (RFC 8707): any http://127.0.0.1 URL is a resource server, and an access
//   token for it is an RS256 JWT (typ at+jwt) whose `aud` is that URL and whose `scope` holds
//   the requested resource scopes (of resourceScopes), e.g. "mcp:tools".
// - open dynamic client registration (RFC 7591), revocation and introspection. The discovery
//   documents' scopes_supported lists the resource scopes with openid and offline_access. A registration
//   may carry the test-only metadata `test_access_token_ttl` (seconds): that client's access
//   tokens then live that long (how a test gets a token that expires soon, without making
//   every client's tokens short-lived).
// - the development login and consent pages: any login and password are accepted.
//
// Test-only endpoints (not part of any standard):
//   POST /test/revoke?sub=ada  drop every grant, authorization code, refresh token and stored
//                              access token of that subject (JWT access tokens are not stored:
//                              they stay valid until they expire, as with any JWT)
//   GET  /test/events          counts of token-endpoint grants, by grant type then subject:
//                              {"authorization_code": {"ada": 1}, "refresh_token": {"ada": 2},
//                               "refresh_token_errors": {"ada": 1}, "errors": [{...}, ...]}
//   POST /test/reset-events    zero those counts
//   POST /test/rotate          body {"keys": [jwk, ...]}: sign with the new keys from the next
//                              request on, on the same issuer and port, keeping everything stored
//                              (registrations, grants, refresh tokens, logins). oidc-provider
//                              reads its keys once, when built, so this builds a new Provider
//                              over the same storage and swaps it in; answers {"kids": [...]}
//   POST /test/groups          body {"ada": ["mcp-users"], "grace": null}: set (a list) or drop
//                              (null) subjects' groups for tokens issued from then on; answers
//                              the whole map

import crypto from 'node:crypto';
import http from 'node:http';

import Provider, { errors } from 'oidc-provider';

// stdout carries the ready line only: oidc-provider prints its development notices with
// console.info (stdout) and its warnings with console.warn (stderr). Send all console output to
// stderr, and write the ready line straight to the stream.
for (const name of ['log', 'info', 'debug']) {
  console[name] = (...args) => console.error(...args);
}

const options = process.argv[2] ? JSON.parse(process.argv[2]) : {};
const seconds = (value, fallback) => {
  const number = Number(value ?? fallback);
  if (!Number.isInteger(number) || number <= 0) {
    throw new Error(`not a positive number of seconds: ${value}`);
  }
  return number;
};
const accessTokenTtl = seconds(options.accessTokenTtl ?? process.env.ACCESS_TOKEN_TTL, 60);
const refreshTokenTtl = seconds(options.refreshTokenTtl ?? process.env.REFRESH_TOKEN_TTL, 3600);
const resourceScopes = options.resourceScopes ?? 'mail.read mail.send mcp:tools';
const clients = options.clients ?? [];
const port = Number(options.port ?? 0);
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  throw new Error(`not a port: ${options.port}`);
}
const groups = new Map(Object.entries(options.groups ?? {}));
// The browser session cookies stay valid across a key rotation: it is the same provider.
const cookieKeys = [crypto.randomBytes(32).toString('base64url')];

// --- storage ------------------------------------------------------------------------------
// oidc-provider's own memory adapter indexes tokens by grant only. /test/revoke needs "everything
// of this subject", so this small adapter keeps every artifact in one map it can scan. It also
// remembers which subject a revoked token belonged to (revoked by /test/revoke, or with its whole
// grant when a used refresh token came back), so that a later refresh with it, which
// oidc-provider reports only as "not found", is still counted under that subject.

const store = new Map(); // `${model}:${id}` -> { model, payload, expiresAt (ms) }
const revokedOwners = new Map(); // token id -> subject, for tokens revoked before they expired

function forget(key, entry) {
  store.delete(key);
  if (entry.payload.accountId) {
    revokedOwners.set(key.slice(key.indexOf(':') + 1), entry.payload.accountId);
  }
}

class TestAdapter {
  constructor(model) {
    this.model = model;
  }

  key(id) {
    return `${this.model}:${id}`;
  }

  live(key) {
    const entry = store.get(key);
    if (entry && entry.expiresAt <= Date.now()) {
      store.delete(key);
      return undefined;
    }
    return entry;
  }

  async upsert(id, payload, expiresIn) {
    const expiresAt = typeof expiresIn === 'number' ? Date.now() + expiresIn * 1000 : Infinity;
    store.set(this.key(id), { model: this.model, payload, expiresAt });
  }

  async find(id) {
    return this.live(this.key(id))?.payload;
  }

  findBy(field, value) {
    for (const [key, entry] of store) {
      if (entry.model === this.model && entry.payload[field] === value) {
        return this.live(key)?.payload;
      }
    }
    return undefined;
  }

  async findByUid(uid) {
    return this.findBy('uid', uid);
  }

  async findByUserCode(userCode) {
    return this.findBy('userCode', userCode);
  }

  async consume(id) {
    const entry = this.live(this.key(id));
    if (entry) {
      entry.payload.consumed = Math.floor(Date.now() / 1000);
    }
  }

  async destroy(id) {
    store.delete(this.key(id));
  }

  async revokeByGrantId(grantId) {
    for (const [key, entry] of store) {
      if (entry.payload.grantId === grantId) {
        forget(key, entry);
      }
    }
  }
}

function revokeSubject(sub) {
  const idOf = (key) => key.slice(key.indexOf(':') + 1);
  const grantIds = new Set();
  for (const [key, entry] of store) {
    if (entry.model === 'Grant' && entry.payload.accountId === sub) {
      grantIds.add(idOf(key));
    }
  }
  let dropped = 0;
  for (const [key, entry] of store) {
    const { model, payload } = entry;
    if (model === 'Session' || model === 'Interaction') {
      continue; // a login is not a grant; the next authorization asks for consent again
    }
    const grantId = model === 'Grant' ? idOf(key) : payload.grantId;
    if (payload.accountId === sub || grantIds.has(grantId)) {
      forget(key, entry);
      dropped += 1;
    }
  }
  return { sub, grants: grantIds.size, dropped };
}

// --- events -------------------------------------------------------------------------------

let events = {};

function count(bucket, sub) {
  events[bucket] ??= {};
  events[bucket][sub] = (events[bucket][sub] ?? 0) + 1;
}

function subjectOf(ctx) {
  const { entities, params } = ctx.oidc;
  return entities?.Account?.accountId
    ?? entities?.RefreshToken?.accountId
    ?? entities?.AuthorizationCode?.accountId
    ?? revokedOwners.get(params?.refresh_token)
    ?? '(unknown)';
}

// --- the provider -------------------------------------------------------------------------

function isLoopbackResource(resource) {
  const url = URL.parse(resource);
  return url !== null && url.protocol === 'http:' && url.hostname === '127.0.0.1' && !url.hash;
}

function generatedKey() {
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  return { ...privateKey.export({ format: 'jwk' }), kid: 'test-rs256', alg: 'RS256', use: 'sig' };
}

function signingKeys(keys) {
  if (!Array.isArray(keys) || keys.length === 0) {
    throw new Error('keys must be a non-empty list of private JWKs');
  }
  return keys.map((key) => {
    if (key?.kty !== 'RSA' || !key.d || typeof key.kid !== 'string') {
      throw new Error(`a signing key must be a private RSA JWK with a kid (got kid ${key?.kid})`);
    }
    return { ...key, alg: 'RS256', use: 'sig' };
  });
}

// The key ids, in the order the JWKS publishes them (the first is the one that signs).
function kidsOf(keys) {
  return keys.map((key) => key.kid);
}

function accessTokenTtlFor(client) {
  return client?.test_access_token_ttl ?? accessTokenTtl;
}

function configuration(keys) {
  return {
    adapter: TestAdapter,
    clients,
    clientDefaults: {
      grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'],
      token_endpoint_auth_method: 'client_secret_basic',
    },
    cookies: { keys: cookieKeys },
    jwks: { keys },
    responseTypes: ['code'], // OAuth 2.1: no implicit or hybrid flows
    // The resource scopes are listed too: a dynamic registration may name the scopes the client
    // will ask for (mcp-remote and the MCP SDKs send those of the resource's metadata), and
    // oidc-provider refuses one naming a scope missing here (invalid_client_metadata).
    scopes: ['openid', 'offline_access', ...resourceScopes.split(' ').filter(Boolean)],
    claims: { openid: ['sub'] },
    findAccount: (ctx, sub) => ({ accountId: sub, claims: () => ({ sub }) }),
    extraClientMetadata: {
      properties: ['test_access_token_ttl'],
      validator: (ctx, key, value) => {
        if (key === 'test_access_token_ttl' && value !== undefined && !(Number.isInteger(value) && value > 0)) {
          throw new errors.InvalidClientMetadata('test_access_token_ttl must be a positive number of seconds');
        }
      },
    },
    // Claims a resource server sees in a JWT access token (and introspection in an opaque one),
    // on top of iss, sub, aud, exp, iat, jti, client_id and scope.
    extraTokenClaims: (ctx, token) => {
      const subjectGroups = token.accountId === undefined ? undefined : groups.get(token.accountId);
      return subjectGroups === undefined ? undefined : { groups: [...subjectGroups] };
    },
    pkce: { required: () => true },
    rotateRefreshToken: true,
    issueRefreshToken: (ctx, client) => client.grantTypeAllowed('refresh_token'),
    // A refresh token outlives the provider's browser session (the default only lets one with
    // offline_access do so): the gateway holds it long after the user closed the consent page.
    expiresWithSession: () => false,
    ttl: {
      AccessToken: (ctx, token, client) => accessTokenTtlFor(client),
      AuthorizationCode: 60,
      ClientCredentials: (ctx, token, client) => accessTokenTtlFor(client),
      Grant: refreshTokenTtl,
      IdToken: accessTokenTtl,
      Interaction: 600,
      RefreshToken: refreshTokenTtl,
      Session: 3600,
    },
    features: {
      devInteractions: { enabled: true },
      registration: { enabled: true, initialAccessToken: false },
      revocation: { enabled: true },
      introspection: { enabled: true },
      resourceIndicators: {
        enabled: true,
        getResourceServerInfo: (ctx, resource, client) => {
          if (!isLoopbackResource(resource)) {
            throw new errors.InvalidTarget(`${resource} is not a resource server here`);
          }
          // A resource whose path ends in /opaque gets opaque access tokens, which only the
          // introspection endpoint (RFC 7662) can validate; every other one gets RS256 JWTs.
          if (new URL(resource).pathname.endsWith('/opaque')) {
            return { scope: resourceScopes, audience: resource, accessTokenTTL: accessTokenTtlFor(client), accessTokenFormat: 'opaque' };
          }
          return {
            scope: resourceScopes,
            audience: resource,
            accessTokenTTL: accessTokenTtlFor(client),
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg: 'RS256' } },
          };
        },
      },
    },
  };
}

function json(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

const MAX_BODY_BYTES = 1 << 20;

function readJson(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY_BYTES) {
        reject(new Error('body too large'));
        req.destroy();
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => {
      try {
        resolve(JSON.parse(Buffer.concat(chunks).toString('utf8') || 'null'));
      } catch (error) {
        reject(error);
      }
    });
    req.on('error', reject);
  });
}

function setGroups(changes) {
  if (changes === null || typeof changes !== 'object' || Array.isArray(changes)) {
    throw new Error('the body must be an object: {"sub": ["group", ...] or null}');
  }
  for (const [sub, list] of Object.entries(changes)) {
    if (list === null) {
      groups.delete(sub);
    } else if (Array.isArray(list) && list.every((group) => typeof group === 'string')) {
      groups.set(sub, list);
    } else {
      throw new Error(`the groups of ${sub} must be a list of strings or null`);
    }
  }
  return Object.fromEntries(groups);
}

async function control(req, res, url) {
  const route = `${req.method} ${url.pathname}`;
  switch (route) {
    case 'POST /test/revoke': {
      const sub = url.searchParams.get('sub');
      if (!sub) {
        return json(res, 400, { error: 'sub is required' });
      }
      return json(res, 200, revokeSubject(sub));
    }
    case 'GET /test/events':
      return json(res, 200, events);
    case 'POST /test/reset-events':
      events = {};
      return json(res, 200, events);
    case 'POST /test/rotate': {
      const keys = signingKeys((await readJson(req))?.keys);
      serve(keys);
      return json(res, 200, { kids: kidsOf(keys) });
    }
    case 'POST /test/groups':
      return json(res, 200, setGroups(await readJson(req)));
    default:
      return json(res, 404, { error: `no test endpoint ${route}` });
  }
}

// --- serving ------------------------------------------------------------------------------

let issuer; // known once the server listens (it names the port)
let callback; // the current provider's request handler

// Build a provider signing with `keys` and send every later request to it. Requests already
// being handled finish on the provider they started on; both share the storage above.
function serve(keys) {
  const provider = new Provider(issuer, configuration(keys));

  provider.on('grant.success', (ctx) => {
    count(ctx.oidc.params.grant_type, subjectOf(ctx));
  });
  provider.on('grant.error', (ctx, error) => {
    const grantType = ctx.oidc.params?.grant_type ?? '(none)';
    const sub = subjectOf(ctx);
    count(`${grantType}_errors`, sub);
    events.errors ??= [];
    // error_description is generic for invalid_grant ("grant request is invalid"); the reason is
    // in error_detail, which oidc-provider keeps from the client.
    events.errors.push({ grant_type: grantType, sub, error: error.error, detail: error.error_detail ?? error.error_description });
  });
  provider.on('server_error', (ctx, error) => {
    console.error('oidc-provider server_error', error);
  });

  callback = provider.callback();
}

const initialKeys = options.keys === undefined ? [generatedKey()] : signingKeys(options.keys);

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://127.0.0.1');
  if (url.pathname.startsWith('/test/')) {
    return control(req, res, url).catch((error) => json(res, 400, { error: String(error.message ?? error) }));
  }
  if (!callback) {
    return json(res, 503, { error: 'starting' });
  }
  return callback(req, res);
});

server.on('error', (error) => {
  console.error(`cannot listen on 127.0.0.1:${port}:`, error.message);
  process.exit(1);
});

server.listen(port, '127.0.0.1', () => {
  issuer = `http://127.0.0.1:${server.address().port}`;
  serve(initialKeys);
  process.stdout.write(`READY ${issuer}\n`);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.closeAllConnections();
    server.close(() => process.exit(0));
  });
}
