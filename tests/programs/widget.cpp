#include <cstdio>
#include <vector>

namespace app {
struct Widget {
    std::vector<int> *values = nullptr;
    int poke(int i) const {
        return (*values)[i] + 1; /* MARK:poke */
    }
};

__attribute__((noinline)) int render(const Widget &w, int i) {
    return w.poke(i) * 2; /* MARK:render */
}
} // namespace app

int main(int argc, char **) {
    app::Widget w;
    std::printf("%d\n", app::render(w, argc)); /* MARK:main */
    return 0;
}
