/*
 * npctalk C client: talk to `npctalk serve` over ZeroMQ (protocol v1, bindings/PROTOCOL.md).
 *
 * One npctalk_client owns one DEALER socket. Requests:
 *   - blocking calls with one answer: npctalk_hello, npctalk_ping, npctalk_upsert_npc(_msgpack). Each waits
 *     at most options.timeout_ms of server silence per attempt and retries (Lazy Pirate: close the
 *     socket with LINGER 0, reopen, resend) up to options.retries times.
 *   - streams: npctalk_say returns at once; npctalk_poll (timeout 0 from a game loop: never blocks)
 *     receives what arrived and calls the reply's callbacks: on_token for each chunk, then exactly
 *     one of on_done / on_error. npctalk_cancel asks the server to end a reply early.
 * While anything is pending the client pings the server every heartbeat_ms (the server drops
 * clients silent for its --client-timeout); when the server says nothing for timeout_ms, the
 * connection is replaced and running replies fail with NPCTALK_E_UNAVAILABLE (a half-shown reply
 * cannot be resumed). The same happens at once when the TCP connection drops underneath (a socket
 * monitor sees it).
 *
 * Threads: a client is not thread-safe; use it from one thread (the game loop). Different clients
 * may live in different threads. Strings passed to callbacks are valid only during the call.
 * Callbacks may call npctalk_say and npctalk_cancel; npctalk_close from a callback takes effect when
 * the npctalk_* call that ran the callback returns; blocking calls and npctalk_poll from a callback
 * fail with NPCTALK_E_INVALID_ARGUMENT.
 */
#ifndef NPCTALK_H
#define NPCTALK_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define NPCTALK_PROTOCOL_VERSION 1
#define NPCTALK_DEFAULT_ENDPOINT "tcp://127.0.0.1:5555"

/* Outcome of every call. 1..8 are the server's error codes (PROTOCOL.md "Errors"), one to one;
 * 20.. are found on this side of the socket. npctalk_status_name gives the protocol's spelling. */
typedef enum npctalk_status {
    NPCTALK_OK = 0,
    NPCTALK_E_BAD_REQUEST = 1,         /* bad_request: the request broke the protocol */
    NPCTALK_E_UNSUPPORTED_VERSION = 2, /* unsupported_version */
    NPCTALK_E_UNKNOWN_OP = 3,          /* unknown_op */
    NPCTALK_E_UNKNOWN_NPC = 4,         /* unknown_npc: npctalk_upsert_npc it first */
    NPCTALK_E_TOO_LARGE = 5,           /* too_large: text, context or prompt over a limit */
    NPCTALK_E_BUSY = 6,                /* busy: queue full or server shutting down; retry later */
    NPCTALK_E_TIMEOUT = 7,             /* timeout: the request's deadline passed */
    NPCTALK_E_INTERNAL = 8,            /* internal: a server bug; it keeps serving */
    NPCTALK_E_UNAVAILABLE = 20,        /* no message from the server within timeout_ms (after retries) */
    NPCTALK_E_PROTOCOL = 21,           /* the server sent something unreadable (bad frame, seq gap) */
    NPCTALK_E_INVALID_ARGUMENT = 22,   /* a bad argument, or a call not allowed here (see message) */
    NPCTALK_E_NO_MEMORY = 23,          /* an allocation failed */
    NPCTALK_E_SOCKET = 24              /* libzmq refused (bad endpoint, send queue full, ...) */
} npctalk_status;

/* The protocol's name of a status ("unknown_npc", "ok", client-side: "unavailable", ...). */
const char *npctalk_status_name(npctalk_status status);
/* The status whose protocol name is `code`; NPCTALK_E_INTERNAL for an unknown code. */
npctalk_status npctalk_status_from_code(const char *code);

typedef struct npctalk_options {
    int timeout_ms;   /* server silence while something is pending that counts as lost (default 3000) */
    int retries;      /* resends of a blocking call after a lost connection (default 2) */
    int heartbeat_ms; /* ping interval while something is pending (default 1000, at most timeout_ms/2) */
    /* Optional: told about reconnects and frames the client ignored (a game forwards these to its
     * own log). NULL: silent. */
    void (*log)(void *user, const char *message);
    void *log_user;
    /* CURVE encryption and authentication (PROTOCOL.md "Transport"; `npctalk keygen` makes the keys):
     * all three Z85 keys (40 characters each, e.g. from npctalk_load_curve_keys) or all NULL. A
     * server that refuses the keys drops the handshake silently: calls end with NPCTALK_E_UNAVAILABLE. */
    const char *curve_server_key; /* the server's public key (its NAME.key) */
    const char *curve_public_key; /* this client's key pair (its NAME.key_secret) */
    const char *curve_secret_key;
} npctalk_options;

npctalk_options npctalk_default_options(void);

typedef struct npctalk_curve_keys {
    char server_key[41], public_key[41], secret_key[41]; /* Z85, NUL-terminated */
} npctalk_curve_keys;

/* Read the server's public certificate (NAME.key) and this client's secret certificate
 * (NAME.key_secret), as written by `npctalk keygen`, into `keys`. On failure `error` (may be NULL)
 * gets a sentence naming the file and the problem. */
npctalk_status npctalk_load_curve_keys(const char *server_key_file, const char *client_secret_file,
                                       npctalk_curve_keys *keys, char *error, size_t error_cap);

typedef struct npctalk_client npctalk_client;

/* Connect a DEALER socket to `endpoint` (tcp://host:port or ipc://path). Connecting never waits
 * for the server: the first request finds out whether it answers. `options` may be NULL.
 * On failure *out is NULL and the status says why (npctalk_connect_error has the sentence). */
npctalk_status npctalk_connect(const char *endpoint, const npctalk_options *options, npctalk_client **out);
/* The sentence explaining this thread's last npctalk_connect failure (static storage). */
const char *npctalk_connect_error(void);
/* Close the socket (LINGER 0) and free the client. Running replies get no more callbacks. From a
 * callback: deferred until the npctalk_poll (or blocking call) that ran it returns. */
void npctalk_close(npctalk_client *client);
/* A sentence explaining the last failed call on `client` ("" if none). Valid until the next call. */
const char *npctalk_last_error(const npctalk_client *client);

/* --- blocking calls ------------------------------------------------------------------------------ */

typedef struct npctalk_server_info {
    char server[32];          /* "npctalk" */
    char version[32];         /* the server's version */
    int protocol;             /* the protocol version it speaks */
    char model[128];          /* model name from the bundle manifest (truncated to fit) */
    char dialogue_format[32];
    int max_context;          /* tokens */
    int max_new_tokens;       /* the largest max_new_tokens a say may ask for */
    int client_timeout_ms;    /* the server's silence limit for clients with streams running */
} npctalk_server_info;

npctalk_status npctalk_hello(npctalk_client *client, npctalk_server_info *info);
npctalk_status npctalk_ping(npctalk_client *client);

typedef struct npctalk_strings {
    const char *const *items;
    size_t count;
} npctalk_strings;

/* A persona (PROTOCOL.md "npc.upsert"). name and role are required; NULL strings and empty lists
 * are left out. Fields this struct lacks (lorebook, rerank, a Character Card V2, ...) go through
 * npctalk_upsert_npc_msgpack. */
typedef struct npctalk_persona {
    const char *name;
    const char *role;
    const char *description;
    const char *speaking_style;
    const char *greeting;
    const char *scenario;
    const char *system_override;  /* replaces npctalk's closing instruction; {{original}} keeps it */
    const char *post_history;     /* placed after the dialogue (chat models only) */
    const char *example_dialogue; /* "{{user}}: ..." / "{{char}}: ..." lines */
    npctalk_strings traits;
    npctalk_strings background;
    npctalk_strings goals;
    npctalk_strings unknowns;
    npctalk_strings example_lines;
} npctalk_persona;

/* Create or replace NPC `npc`. *created (may be NULL) is 1 when it did not exist before. */
npctalk_status npctalk_upsert_npc(npctalk_client *client, const char *npc, const npctalk_persona *persona,
                                  int *created);

/* The same with the persona given as one msgpack map, packed by the caller (any persona field,
 * or a whole Character Card V2: {spec: "chara_card_v2", ...}); the server checks its fields. */
npctalk_status npctalk_upsert_npc_msgpack(npctalk_client *client, const char *npc, const void *persona,
                                          size_t persona_len, int *created);

/* Any op with one answer, for the ops without a function of their own (npc.get, npc.list, stats,
 * and whatever the server adds): `fields` is a msgpack map of the op's fields (NULL and 0: none;
 * v, id and op are added here). On NPCTALK_OK, *answer (may be NULL) is the whole ok reply as one
 * msgpack map, allocated with malloc: release it with npctalk_free. */
npctalk_status npctalk_call(npctalk_client *client, const char *op, const void *fields, size_t fields_len,
                            void **answer, size_t *answer_len);
void npctalk_free(void *memory);

/* --- replies (streams) --------------------------------------------------------------------------- */

typedef uint64_t npctalk_reply_id; /* 0 is never a valid reply */

typedef enum npctalk_value_kind {
    NPCTALK_VALUE_STRING,
    NPCTALK_VALUE_INT,
    NPCTALK_VALUE_NUMBER,
    NPCTALK_VALUE_BOOL,
    NPCTALK_VALUE_STRINGS
} npctalk_value_kind;

/* One entry of a say's game-state context, e.g. {"location", NPCTALK_VALUE_STRING, .string = "the forge"}. */
typedef struct npctalk_context_entry {
    const char *key;
    npctalk_value_kind kind;
    const char *string;      /* NPCTALK_VALUE_STRING */
    int64_t integer;         /* NPCTALK_VALUE_INT */
    double number;           /* NPCTALK_VALUE_NUMBER */
    int boolean;             /* NPCTALK_VALUE_BOOL */
    npctalk_strings strings; /* NPCTALK_VALUE_STRINGS */
} npctalk_context_entry;

/* Optional fields of a say. Start from npctalk_say_defaults(): its values mean "the server's
 * default" and are not sent. */
typedef struct npctalk_say_options {
    const char *player;                   /* whose conversation (NULL: "player") */
    const npctalk_context_entry *context; /* `context_count` entries, or NULL */
    size_t context_count;
    int max_new_tokens;                   /* >= 1; 0: server default */
    double temperature;                   /* [0, 5], 0 = greedy; < 0: server default */
    double top_p;                         /* (0, 1]; <= 0: server default */
    int top_k;                            /* >= 0, 0 = off; < 0: server default */
    int64_t seed;                         /* [0, 2^63-1]; < 0: random */
    int deadline_ms;                      /* server-side limit from receipt to done; 0: server's */
    int timeout_ms;                       /* client-side limit from npctalk_say to the end: past it the
                                             reply is cancelled and fails with NPCTALK_E_TIMEOUT; 0: none */
} npctalk_say_options;

npctalk_say_options npctalk_say_defaults(void);

typedef struct npctalk_result {
    npctalk_reply_id reply;
    const char *npc;
    const char *text;          /* the whole reply, UTF-8 (== the token texts concatenated) */
    size_t text_len;           /* bytes */
    const char *finish_reason; /* "stop", "length" or "cancelled" */
    int prompt_tokens;
    int completion_tokens;
    double queue_ms;           /* server milliseconds from receipt: until the prompt started */
    double ttft_ms;            /* ... until the first token (< 0 when there was none) */
    double total_ms;           /* ... until done */
} npctalk_result;

/* Callbacks of one reply; each may be NULL. `user` is passed back untouched. Called only from
 * npctalk_poll (or a blocking call), in the order the server sent the messages. */
typedef struct npctalk_callbacks {
    void (*on_token)(void *user, npctalk_reply_id reply, const char *text, size_t len, uint32_t seq);
    void (*on_done)(void *user, const npctalk_result *result);
    void (*on_error)(void *user, npctalk_reply_id reply, npctalk_status status, const char *message);
    void *user;
} npctalk_callbacks;

/* Send `text` to NPC `npc`; returns at once. *reply (may be NULL) names the stream for
 * npctalk_cancel and the callbacks. `options` and `callbacks` may be NULL. On an immediate failure
 * no callback is called. */
npctalk_status npctalk_say(npctalk_client *client, const char *npc, const char *text,
                           const npctalk_say_options *options, const npctalk_callbacks *callbacks,
                           npctalk_reply_id *reply);

/* Ask the server to end `reply` early: it then ends with on_done, finish_reason "cancelled" and
 * the text sent so far. NPCTALK_E_INVALID_ARGUMENT when `reply` is not running. */
npctalk_status npctalk_cancel(npctalk_client *client, npctalk_reply_id reply);

/* Receive what arrived, call callbacks, send heartbeats, reconnect a silent server. Waits at most
 * `timeout_ms` for the first message (0: never waits; a game calls this once per frame). Returns
 * NPCTALK_OK unless the socket itself failed. */
npctalk_status npctalk_poll(npctalk_client *client, int timeout_ms);

/* Replies still running (a loop `while (npctalk_running(c)) npctalk_poll(c, 50);` waits for all). */
size_t npctalk_running(const npctalk_client *client);

#ifdef __cplusplus
}
#endif

#endif /* NPCTALK_H */
