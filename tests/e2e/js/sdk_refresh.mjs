// matrix-js-sdk (37.5.0) through matrix-refresh-proxy, across several access-token expiries.
//
// Run by tests/e2e/test_sdk.py:  MRP_E2E_BASE_URL=http://127.0.0.1:PORT node sdk_refresh.mjs
//
// Registers a user, then runs two phases, each with its own login (refresh_token: true) and its
// own MatrixClient given refreshToken + tokenRefreshFunction:
//   eager    - tokenRefreshFunction reports the expiry, so the SDK refreshes shortly before it;
//   reactive - no expiry reported, so the SDK only refreshes after a 401 M_UNKNOWN_TOKEN
//              soft_logout from the proxy.
// In each phase a sync loop (startClient) runs while the script calls whoami, createRoom and
// sendMessage, and waits for every sent event to come back through /sync.
// Exits non-zero if the SDK emits SessionLoggedOut, any request fails, the sync loop reports an
// error, or too few refreshes happened. Tokens are never printed.

import { ClientEvent, createClient, HttpApiEvent, SyncState } from "matrix-js-sdk";
import { logger } from "matrix-js-sdk/lib/logger.js";

const baseUrl = process.env.MRP_E2E_BASE_URL;
const phaseMs = Number(process.env.MRP_E2E_PHASE_MS ?? "9000");
const atLifetimeMs = Number(process.env.MRP_E2E_AT_LIFETIME_MS ?? "3000");
const minRefreshes = Number(process.env.MRP_E2E_MIN_REFRESHES ?? "2");
const password = "e2e-Correct-Horse-1";

if (!baseUrl) {
    console.error("MRP_E2E_BASE_URL is not set");
    process.exit(2);
}
logger.setLevel(process.env.MRP_E2E_SDK_LOG ?? "warn", false);

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const failures = [];
function fail(msg) {
    failures.push(msg);
    console.error(`FAIL: ${msg}`);
}
function describe(err) {
    if (!err) return String(err);
    const code = err.httpStatus ?? err.code ?? "";
    const errcode = err.errcode ?? err.data?.errcode ?? "";
    return `${err.name ?? "Error"} ${code} ${errcode} ${err.message ?? ""}`.replace(/\s+/g, " ").trim();
}

// Hard stop: the run must end by itself.
const watchdog = setTimeout(() => {
    console.error("FAIL: watchdog: the SDK scenario did not finish in time");
    process.exit(1);
}, 4 * phaseMs + 90_000);

async function registerUser() {
    const anon = createClient({ baseUrl });
    const username = `sdk-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
    const res = await anon.registerRequest({
        username,
        password,
        auth: { type: "m.login.dummy" },
        inhibit_login: true,
    });
    return res.user_id;
}

async function login(userId) {
    const anon = createClient({ baseUrl });
    const res = await anon.loginRequest({
        type: "m.login.password",
        identifier: { type: "m.id.user", user: userId },
        password,
        refresh_token: true,
        initial_device_display_name: "matrix-js-sdk e2e",
    });
    if (typeof res.refresh_token !== "string" || !res.refresh_token) {
        throw new Error("login with refresh_token: true returned no refresh_token");
    }
    // (the exact value is checked by the Python scenarios)
    if (!(res.expires_in_ms > atLifetimeMs - 1000 && res.expires_in_ms <= atLifetimeMs)) {
        throw new Error(`login expires_in_ms ${res.expires_in_ms}, expected about ${atLifetimeMs}`);
    }
    return res;
}

function waitFor(pred, timeoutMs, what) {
    return new Promise((resolve, reject) => {
        const start = Date.now();
        const tick = () => {
            if (pred()) return resolve();
            if (Date.now() - start > timeoutMs) return reject(new Error(`timed out waiting for ${what}`));
            setTimeout(tick, 50);
        };
        tick();
    });
}

async function runPhase(name, userId, reportExpiry) {
    const creds = await login(userId);
    const stats = { refreshes: 0, whoami: 0, rooms: 0, messages: 0, syncs: 0 };
    let loggedOut = false;

    const tokenRefreshFunction = async (refreshToken) => {
        // a separate credential-less client, as Element does: /refresh needs no access token
        const tmp = createClient({ baseUrl });
        const res = await tmp.refreshToken(refreshToken);
        stats.refreshes += 1;
        if (typeof res.access_token !== "string" || typeof res.refresh_token !== "string") {
            fail(`${name}: /refresh answer lacks tokens`);
        }
        return {
            accessToken: res.access_token,
            refreshToken: res.refresh_token,
            expiry: reportExpiry ? new Date(Date.now() + res.expires_in_ms) : undefined,
        };
    };

    const client = createClient({
        baseUrl,
        accessToken: creds.access_token,
        refreshToken: creds.refresh_token,
        userId: creds.user_id,
        deviceId: creds.device_id,
        tokenRefreshFunction,
    });
    client.on(HttpApiEvent.SessionLoggedOut, (err) => {
        loggedOut = true;
        fail(`${name}: the SDK emitted SessionLoggedOut: ${describe(err)}`);
    });
    client.on(ClientEvent.Sync, (state, _prev, data) => {
        if (state === SyncState.Syncing || state === SyncState.Prepared) stats.syncs += 1;
        if (state === SyncState.Error || state === SyncState.Reconnecting) {
            fail(`${name}: sync state ${state}: ${describe(data?.error)}`);
        }
    });
    const seen = new Set();
    // every event a /sync response delivers (RoomEvent.Timeline would only show the local echo)
    client.on(ClientEvent.Event, (ev) => seen.add(ev.getId()));

    await client.startClient({ initialSyncLimit: 5, pollTimeout: 5000, lazyLoadMembers: true });
    await waitFor(() => client.getSyncState() === SyncState.Prepared || client.getSyncState() === SyncState.Syncing,
        30_000, "the first sync");

    const end = Date.now() + phaseMs;
    let roomId = null;
    let i = 0;
    while (Date.now() < end && !loggedOut) {
        try {
            const me = await client.whoami();
            stats.whoami += 1;
            if (me.user_id !== creds.user_id || me.device_id !== creds.device_id) {
                fail(`${name}: whoami names ${me.user_id}/${me.device_id}, expected the login's user/device`);
            }
            if (roomId === null || i % 4 === 0) {
                roomId = (await client.createRoom({ name: `e2e ${name} ${i}` })).room_id;
                stats.rooms += 1;
            }
            const { event_id: eventId } = await client.sendMessage(roomId, {
                msgtype: "m.text",
                body: `${name} message ${i}`,
            });
            stats.messages += 1;
            await waitFor(() => seen.has(eventId), 15_000, `${name}: event ${i} to come back through /sync`);
        } catch (err) {
            fail(`${name}: request ${i} failed: ${describe(err)}`);
            break;
        }
        i += 1;
        await sleep(300);
    }
    client.stopClient();

    console.log(`${name}: ${JSON.stringify(stats)}`);
    if (stats.refreshes < minRefreshes) {
        fail(`${name}: only ${stats.refreshes} token refreshes in ${phaseMs} ms (expected >= ${minRefreshes})`);
    }
    if (stats.messages < 3) fail(`${name}: only ${stats.messages} messages sent`);
}

try {
    const userId = await registerUser();
    await runPhase("eager", userId, true);
    await runPhase("reactive", userId, false);
} catch (err) {
    fail(`unexpected error: ${describe(err)}`);
}
clearTimeout(watchdog);
if (failures.length) {
    console.error(`${failures.length} failure(s)`);
    process.exit(1);
}
console.log("js-sdk scenario: ok");
process.exit(0);
