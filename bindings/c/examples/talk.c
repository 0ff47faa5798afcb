/*
 * talk: say one line to an NPC through `npctalk serve` and print the reply as it streams.
 *
 *   talk --npc bram "Got any iron?"
 *   talk --npc mira --persona-name Mira --persona-role "the herbalist" --context location="the garden" Hello
 *   talk --cancel-after 5 "Tell me a long story."
 *
 * Tokens go to stdout as they arrive; a summary line (finish reason, token counts, timings) goes to
 * stderr. Exit status: 0 when the reply ended (stop, length or cancelled), 64 for bad usage, and
 * otherwise the npctalk_status number of the failure (`talk --list-status` prints them).
 */
#define _POSIX_C_SOURCE 200809L /* nanosleep, clock_gettime */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "npctalk/npctalk.h"

#define EXIT_USAGE 64
#define MAX_CONTEXT 16

typedef struct run {
    npctalk_client *client;
    npctalk_reply_id reply;
    long cancel_after;      /* cancel after this many token messages; < 0: never */
    long tokens_seen;
    int finished;
    npctalk_status status;
    int print_done;
} run;

static void on_token(void *user, npctalk_reply_id reply, const char *text, size_t len, uint32_t seq) {
    run *r = user;
    (void)seq;
    fwrite(text, 1, len, stdout);
    fflush(stdout);
    if (++r->tokens_seen == r->cancel_after) {
        npctalk_status status = npctalk_cancel(r->client, reply);
        fprintf(stderr, "[cancel after %ld token messages: %s]\n", r->tokens_seen, npctalk_status_name(status));
    }
}

static void on_done(void *user, const npctalk_result *result) {
    run *r = user;
    if (r->print_done) {
        printf("\n--- done ---\n");
        fwrite(result->text, 1, result->text_len, stdout); /* bytes: a reply may hold a NUL */
    }
    printf("\n");
    fprintf(stderr, "done: finish_reason=%s completion_tokens=%d prompt_tokens=%d token_messages=%ld "
                    "queue_ms=%.1f ttft_ms=%.1f total_ms=%.1f\n",
            result->finish_reason, result->completion_tokens, result->prompt_tokens, r->tokens_seen,
            result->queue_ms, result->ttft_ms, result->total_ms);
    r->finished = 1;
}

static void on_error(void *user, npctalk_reply_id reply, npctalk_status status, const char *message) {
    run *r = user;
    (void)reply;
    printf("\n");
    fprintf(stderr, "error: %s: %s\n", npctalk_status_name(status), message);
    r->finished = 1;
    r->status = status;
}

static void log_to_stderr(void *user, const char *message) {
    (void)user;
    fprintf(stderr, "[npctalk] %s\n", message);
}

static void usage(FILE *to) {
    fprintf(to,
            "usage: talk [options] TEXT\n"
            "  --endpoint E           server endpoint (default %s)\n"
            "  --npc ID               who answers (default bram)\n"
            "  --player ID            whose conversation (default: the server's \"player\")\n"
            "  --persona-name NAME --persona-role ROLE   create or replace the NPC first\n"
            "  --persona-msgpack FILE create or replace the NPC first from a msgpack persona map / card\n"
            "  --curve-server-key FILE --curve-client-secret FILE   CURVE: server's NAME.key, own NAME.key_secret\n"
            "  --context KEY=VALUE    game state for this reply (repeatable, up to %d)\n"
            "  --max-new-tokens N  --temperature X  --top-p X  --top-k N  --seed N  --deadline-ms N\n"
            "  --timeout-ms N         server silence that counts as lost (default 3000)\n"
            "  --retries N            resends of hello/upsert after a lost connection (default 2)\n"
            "  --reply-timeout-ms N   client-side limit for the whole reply (default none)\n"
            "  --cancel-after N       cancel the reply after N token messages\n"
            "  --frame-ms N           act like a game: npctalk_poll(client, 0) every N ms, report the slowest\n"
            "  --print-done           after the stream, print a '--- done ---' line and the done text\n"
            "  --list-status          print every status number and name, then exit\n",
            NPCTALK_DEFAULT_ENDPOINT, MAX_CONTEXT);
}

static int parse_long(const char *flag, const char *value, long low, long high, long *out) {
    char *end;
    errno = 0;
    long v = strtol(value, &end, 10);
    if (errno || *end || end == value || v < low || v > high) {
        fprintf(stderr, "talk: %s needs an integer in [%ld, %ld], got '%s'.\n", flag, low, high, value);
        return 0;
    }
    *out = v;
    return 1;
}

static int parse_double(const char *flag, const char *value, double *out) {
    char *end;
    errno = 0;
    double v = strtod(value, &end);
    if (errno || *end || end == value) {
        fprintf(stderr, "talk: %s needs a number, got '%s'.\n", flag, value);
        return 0;
    }
    *out = v;
    return 1;
}

static void list_status(void) {
    const npctalk_status all[] = {NPCTALK_OK, NPCTALK_E_BAD_REQUEST, NPCTALK_E_UNSUPPORTED_VERSION,
                                  NPCTALK_E_UNKNOWN_OP, NPCTALK_E_UNKNOWN_NPC, NPCTALK_E_TOO_LARGE, NPCTALK_E_BUSY,
                                  NPCTALK_E_TIMEOUT, NPCTALK_E_INTERNAL, NPCTALK_E_UNAVAILABLE, NPCTALK_E_PROTOCOL,
                                  NPCTALK_E_INVALID_ARGUMENT, NPCTALK_E_NO_MEMORY, NPCTALK_E_SOCKET};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) printf("%d %s\n", (int)all[i], npctalk_status_name(all[i]));
}

static double seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* A game's frame loop: one zero-wait poll per frame, the rest of the frame is the game's. */
static npctalk_status game_loop(run *r, long frame_ms) {
    struct timespec frame = {frame_ms / 1000, (frame_ms % 1000) * 1000000L};
    double slowest = 0.0;
    long polls = 0;
    while (!r->finished) {
        double start = seconds();
        npctalk_status status = npctalk_poll(r->client, 0);
        if (status != NPCTALK_OK) return status;
        double took = seconds() - start;
        slowest = took > slowest ? took : slowest;
        polls++;
        nanosleep(&frame, NULL);
    }
    fprintf(stderr, "game_loop: polls=%ld slowest_poll_ms=%.3f\n", polls, slowest * 1000.0);
    return NPCTALK_OK;
}

/* The whole of a small file (a persona); NULL with a message on stderr when it cannot be read. */
static char *read_file(const char *path, size_t *len) {
    FILE *file = fopen(path, "rb");
    char *data = NULL;
    if (file && fseek(file, 0, SEEK_END) == 0) {
        long size = ftell(file);
        if (size >= 0 && size <= (1L << 20) && fseek(file, 0, SEEK_SET) == 0 && (data = malloc((size_t)size + 1))) {
            *len = fread(data, 1, (size_t)size, file);
            if (*len != (size_t)size) {
                free(data);
                data = NULL;
            }
        }
    }
    if (file) fclose(file);
    if (data == NULL) fprintf(stderr, "talk: cannot read %s (a file of at most 1 MiB).\n", path);
    return data;
}

static int fail_with(npctalk_client *client, npctalk_status status, const char *what) {
    fprintf(stderr, "error: %s: %s failed: %s\n", npctalk_status_name(status), what, npctalk_last_error(client));
    npctalk_close(client);
    return (int)status;
}

int main(int argc, char **argv) {
    const char *endpoint = NPCTALK_DEFAULT_ENDPOINT, *npc = "bram", *text = NULL;
    const char *persona_name = NULL, *persona_role = NULL, *persona_file = NULL;
    const char *curve_server = NULL, *curve_client = NULL;
    npctalk_options options = npctalk_default_options();
    options.log = log_to_stderr;
    npctalk_say_options say = npctalk_say_defaults();
    npctalk_context_entry context[MAX_CONTEXT];
    size_t context_count = 0;
    run r = {NULL, 0, -1, 0, 0, NPCTALK_OK, 0};
    long n, frame_ms = 0;
    for (int i = 1; i < argc; i++) {
        const char *flag = argv[i];
        const char *value = i + 1 < argc ? argv[i + 1] : NULL;
        int takes_value = strncmp(flag, "--", 2) == 0 && strcmp(flag, "--print-done") != 0 &&
                          strcmp(flag, "--list-status") != 0 && strcmp(flag, "--help") != 0;
        if (takes_value && value == NULL) {
            fprintf(stderr, "talk: %s needs a value.\n", flag);
            return EXIT_USAGE;
        }
        int ok = 1;
        if (strcmp(flag, "-h") == 0 || strcmp(flag, "--help") == 0) { usage(stdout); return 0; }
        else if (strcmp(flag, "--list-status") == 0) { list_status(); return 0; }
        else if (strcmp(flag, "--print-done") == 0) { r.print_done = 1; continue; }
        else if (!takes_value) {
            if (text != NULL) { fprintf(stderr, "talk: give the text once (quote it).\n"); return EXIT_USAGE; }
            text = flag;
            continue;
        }
        else if (strcmp(flag, "--endpoint") == 0) endpoint = value;
        else if (strcmp(flag, "--npc") == 0) npc = value;
        else if (strcmp(flag, "--player") == 0) say.player = value;
        else if (strcmp(flag, "--persona-name") == 0) persona_name = value;
        else if (strcmp(flag, "--persona-role") == 0) persona_role = value;
        else if (strcmp(flag, "--persona-msgpack") == 0) persona_file = value;
        else if (strcmp(flag, "--curve-server-key") == 0) curve_server = value;
        else if (strcmp(flag, "--curve-client-secret") == 0) curve_client = value;
        else if (strcmp(flag, "--context") == 0) {
            const char *eq = strchr(value, '=');
            if (eq == NULL || eq == value || context_count == MAX_CONTEXT) {
                fprintf(stderr, "talk: --context needs KEY=VALUE (at most %d), got '%s'.\n", MAX_CONTEXT, value);
                return EXIT_USAGE;
            }
            argv[i + 1][eq - value] = '\0'; /* split in place: argv outlives the request */
            npctalk_context_entry e = {argv[i + 1], NPCTALK_VALUE_STRING, eq + 1, 0, 0.0, 0, {NULL, 0}};
            context[context_count++] = e;
        }
        else if (strcmp(flag, "--max-new-tokens") == 0) { ok = parse_long(flag, value, 1, 1 << 20, &n); say.max_new_tokens = (int)n; }
        else if (strcmp(flag, "--temperature") == 0) ok = parse_double(flag, value, &say.temperature);
        else if (strcmp(flag, "--top-p") == 0) ok = parse_double(flag, value, &say.top_p);
        else if (strcmp(flag, "--top-k") == 0) { ok = parse_long(flag, value, 0, 1 << 20, &n); say.top_k = (int)n; }
        else if (strcmp(flag, "--seed") == 0) { ok = parse_long(flag, value, 0, INT64_MAX, &n); say.seed = n; }
        else if (strcmp(flag, "--deadline-ms") == 0) { ok = parse_long(flag, value, 1, 3600000, &n); say.deadline_ms = (int)n; }
        else if (strcmp(flag, "--timeout-ms") == 0) { ok = parse_long(flag, value, 1, 3600000, &n); options.timeout_ms = (int)n; }
        else if (strcmp(flag, "--retries") == 0) { ok = parse_long(flag, value, 0, 100, &n); options.retries = (int)n; }
        else if (strcmp(flag, "--reply-timeout-ms") == 0) { ok = parse_long(flag, value, 1, 3600000, &n); say.timeout_ms = (int)n; }
        else if (strcmp(flag, "--frame-ms") == 0) ok = parse_long(flag, value, 1, 1000, &frame_ms);
        else if (strcmp(flag, "--cancel-after") == 0) ok = parse_long(flag, value, 1, 1 << 20, &r.cancel_after);
        else { fprintf(stderr, "talk: unknown option %s.\n", flag); usage(stderr); return EXIT_USAGE; }
        if (!ok) return EXIT_USAGE;
        i++;
    }
    if (text == NULL) { usage(stderr); return EXIT_USAGE; }
    if ((persona_name == NULL) != (persona_role == NULL)) {
        fprintf(stderr, "talk: --persona-name and --persona-role go together.\n");
        return EXIT_USAGE;
    }
    if ((curve_server == NULL) != (curve_client == NULL)) {
        fprintf(stderr, "talk: --curve-server-key and --curve-client-secret go together.\n");
        return EXIT_USAGE;
    }
    say.context = context;
    say.context_count = context_count;
    npctalk_curve_keys keys;
    if (curve_server) {
        char why[512];
        npctalk_status loaded = npctalk_load_curve_keys(curve_server, curve_client, &keys, why, sizeof why);
        if (loaded != NPCTALK_OK) {
            fprintf(stderr, "error: %s: %s\n", npctalk_status_name(loaded), why);
            return (int)loaded;
        }
        options.curve_server_key = keys.server_key;
        options.curve_public_key = keys.public_key;
        options.curve_secret_key = keys.secret_key;
    }

    npctalk_status status = npctalk_connect(endpoint, &options, &r.client);
    if (status != NPCTALK_OK) {
        fprintf(stderr, "error: %s: %s\n", npctalk_status_name(status), npctalk_connect_error());
        return (int)status;
    }
    npctalk_server_info info;
    if ((status = npctalk_hello(r.client, &info)) != NPCTALK_OK) return fail_with(r.client, status, "hello");
    fprintf(stderr, "%s %s at %s: model %s (%s), protocol %d\n", info.server, info.version, endpoint, info.model,
            info.dialogue_format, info.protocol);
    if (persona_name) {
        npctalk_persona persona = {0};
        persona.name = persona_name;
        persona.role = persona_role;
        int created = 0;
        if ((status = npctalk_upsert_npc(r.client, npc, &persona, &created)) != NPCTALK_OK)
            return fail_with(r.client, status, "npc.upsert");
        fprintf(stderr, "%s NPC %s\n", created ? "created" : "replaced", npc);
    }
    if (persona_file) {
        size_t len = 0;
        char *persona = read_file(persona_file, &len);
        if (persona == NULL) {
            npctalk_close(r.client);
            return EXIT_USAGE;
        }
        int created = 0;
        status = npctalk_upsert_npc_msgpack(r.client, npc, persona, len, &created);
        free(persona);
        if (status != NPCTALK_OK) return fail_with(r.client, status, "npc.upsert");
        fprintf(stderr, "%s NPC %s from %s\n", created ? "created" : "replaced", npc, persona_file);
    }
    npctalk_callbacks callbacks = {on_token, on_done, on_error, &r};
    if ((status = npctalk_say(r.client, npc, text, &say, &callbacks, &r.reply)) != NPCTALK_OK)
        return fail_with(r.client, status, "say");
    if (frame_ms > 0) {
        if ((status = game_loop(&r, frame_ms)) != NPCTALK_OK) return fail_with(r.client, status, "poll");
    }
    while (!r.finished) { /* waits up to 100 ms per call; a game polls with 0 once per frame instead */
        if ((status = npctalk_poll(r.client, 100)) != NPCTALK_OK) return fail_with(r.client, status, "poll");
    }
    npctalk_close(r.client);
    return (int)r.status;
}
