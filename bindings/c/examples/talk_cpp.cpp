// talk_cpp: the C++ wrapper (npctalk.hpp) in a few lines.
//   talk_cpp ENDPOINT NPC TEXT
// Streams the reply to stdout; exits with the npctalk_status number of a failure (0 when done).
#include <cstdio>
#include <iostream>

#include "npctalk/npctalk.hpp"

int main(int argc, char** argv) {
    if (argc != 4) {
        std::cerr << "usage: talk_cpp ENDPOINT NPC TEXT\n";
        return 64;
    }
    try {
        npctalk::Client client(argv[1]);
        npctalk_server_info info = client.hello();
        std::cerr << info.server << " " << info.version << ": model " << info.model << "\n";
        int status = 0;
        npctalk::Handlers handlers;
        handlers.on_token = [](std::string_view text, uint32_t) { std::cout << text << std::flush; };
        handlers.on_done = [](const npctalk_result& result) {
            std::cout << "\n";
            std::cerr << "done: finish_reason=" << result.finish_reason << " completion_tokens="
                      << result.completion_tokens << "\n";
        };
        handlers.on_error = [&status](npctalk_status code, const std::string& message) {
            std::cerr << "error: " << npctalk_status_name(code) << ": " << message << "\n";
            status = code;
        };
        client.say(argv[2], argv[3], std::move(handlers));
        while (client.running() > 0) client.poll(100);
        return status;
    } catch (const npctalk::Error& error) {
        std::cerr << "error: " << error.what() << "\n";
        return error.status();
    }
}
